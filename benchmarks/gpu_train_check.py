"""Train on a backend (a GPU: cupy) from the shipped sample, then check that an interrupted run resumes to the
same bits. Stage (e) of benchmarks/gpu_check.sh; on a CPU backend the tests run it small.

    python3 benchmarks/gpu_train_check.py [--backend cupy] [--epochs 3] [--out DIR] [--json F]

Run A trains ``--epochs`` epochs without a stop. Run B trains the same settings, is interrupted (as by Ctrl-C)
after step ``--stop-at`` (by default in the middle of epoch 2), and resumes with ``--resume``: its last.npz
must hold A's weights and Adam moments bit for bit, and its history A's losses. Reported: each epoch's
training images/s (``history.csv``'s, training only) and seconds with validation, and the training time of
one epoch projected from the steady rate (epochs after the first, which compiles the kernels) to the
3,728 images of COVID-QU-Ex's Train split (infection data) and the 21,715 of its lung data.
Exit status 0 when both runs end and the resume is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minunet.checkpoint import load_checkpoint  # noqa: E402
from minunet.interrupt import interrupt_after  # noqa: E402
from minunet.train import TrainConfig, train  # noqa: E402

PROJECT_TO = {"COVID-QU-Ex Train (infection data)": 3728, "COVID-QU-Ex lung data": 21715}


def config(a, out) -> TrainConfig:
    return TrainConfig(data=a.data, out=str(out), epochs=a.epochs, batch_size=a.batch_size, size=a.size,
                       base_channels=a.base, depth=a.depth, backend=a.backend, loss="bce+dice", augment=True,
                       seed=a.seed, cache_dir="")


def same_bits(path_a, path_b) -> tuple[bool, list[str]]:
    """Whether two checkpoints hold the same weights and Adam moments, bit for bit; the names that differ."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    differ = [n for n in a.params if not np.array_equal(a.params[n], b.params[n])]
    differ += [f"adam {k} {n}" for k in ("m", "v") for n in a.adam[k] if not np.array_equal(a.adam[k][n], b.adam[k][n])]
    return not differ, differ


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "minunet" / "assets" / "sample"))
    ap.add_argument("--backend", default="cupy")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=int, default=None, help="interrupt run B after this step [middle of epoch 2]")
    ap.add_argument("--out", default=None, help="folder for the two runs [a temporary one]")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="minunet_gpu_train_"))

    t0 = time.perf_counter()
    first = train(config(a, out / "a"))
    print(f"run A: {first.status} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = first.history
    n_batches = (load_checkpoint(out / "a" / "last.npz").meta["state"]["step"] // a.epochs) if rows else 0
    stop_at = a.stop_at or n_batches + max(n_batches // 2, 1)
    t1 = time.perf_counter()
    stopped = train(config(a, out / "b"), interrupt_after(stop_at))
    resumed = train(config(a, out / "b"), resume=True)
    print(f"run B: {stopped.status} after step {stop_at}, then resumed: {resumed.status} "
          f"({time.perf_counter() - t1:.1f} s)", flush=True)
    ok_runs = first.status == "done" and stopped.status == "interrupted" and resumed.status == "done"
    identical, differ = same_bits(out / "a" / "last.npz", out / "b" / "last.npz") if ok_runs else (False, ["runs"])
    same_losses = ok_runs and [r["train_loss"] for r in rows] == [r["train_loss"] for r in resumed.history]

    print(f"{'epoch':>5} {'train loss':>10} {'val dice':>8} {'img/s':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['epoch']:>5} {r['train_loss']:>10.4f} {r['val_dice']:>8.4f} {r['images_per_s']:>8.1f} "
              f"{r['seconds']:>8.1f}")
    steady = [r["images_per_s"] for r in rows[1:]] or [r["images_per_s"] for r in rows]
    img_s = statistics.median(steady) if steady else None
    projected = {name: n / img_s for name, n in PROJECT_TO.items()} if img_s else {}
    for name, s in projected.items():
        print(f"one epoch of {name} ({PROJECT_TO[name]:,} images): {s:.0f} s of training at {img_s:.1f} img/s")
    print(f"resume: {'bit-identical' if identical else 'DIFFERS: ' + ', '.join(differ[:5])}; "
          f"losses {'the same' if same_losses else 'DIFFER'}")
    result = {"backend": a.backend, "data": a.data, "settings": {k: v for k, v in vars(a).items() if k != "json"},
              "stop_at": stop_at, "statuses": [first.status, stopped.status, resumed.status], "history": rows,
              "steady_images_per_s": img_s, "projected_epoch_train_s": projected,
              "resume_bit_identical": identical, "resume_same_losses": same_losses, "differ": differ[:20],
              "seconds": time.perf_counter() - t0}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0 if ok_runs and identical and same_losses else 1


if __name__ == "__main__":
    sys.exit(main())
