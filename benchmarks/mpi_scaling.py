"""Data-parallel training on one machine: 1 process x all its threads against N ranks x 1 thread, and the
cost of one gradient reduction (``Ranks.sum_gradients``) of the default U-Net (base 16, depth 4: 1.94 M
parameters, 7.8 MB of float32 gradients).

Usage (from the repository root, with the ``mpi`` extra installed):
    python benchmarks/mpi_scaling.py                    # batch 8 of 1x256x256, numba, 2 ranks
    python benchmarks/mpi_scaling.py --ranks 4 --steps 5 --json

The driver times one process itself (the training step: ``train.batch_gradient`` and Adam), then
starts ``mpiexec -n RANKS`` on this same script, whose rank 0 reports the same step on the ranks and
the median time of a reduction; then it times one process again (a busy machine drifts). The load
average (``os.getloadavg``) is printed before and after: figures from a shared machine are only as
good as it was quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minunet.distributed import cores, limit_threads, world
from minunet.kernels import get_backend
from minunet.model import UNet
from minunet.optim import Adam
from minunet.train import batch_gradient


def step_rate(ranks, args) -> float:
    """Training images per second of the step (every rank's share of one batch of ``args.batch``)."""
    be = get_backend(args.backend)
    model = UNet(1, 16, 4, backend=be, seed=0)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.batch, 1, args.size, args.size)).astype(np.float32)
    y = (rng.uniform(0, 1, x.shape) > 0.5).astype(np.float32)
    times = []
    for _ in range(args.steps + 1):  # the first one warms up (Numba's cache, scratch buffers)
        ranks.any(False)  # start together
        t = time.perf_counter()
        batch_gradient(model, "bce", x, y, ranks)
        opt.step()
        times.append(time.perf_counter() - t)
    return args.batch / float(np.median(times[1:]))


def reduction_seconds(ranks, repeats: int) -> float:
    """The median wall time of one ``sum_gradients`` of the default U-Net's gradients."""
    be = get_backend("numpy")
    model = UNet(1, 16, 4, backend=be, seed=0)
    for g in model.grads.values():
        g[...] = 1.0
    times = []
    for _ in range(repeats + 1):
        ranks.any(False)
        t = time.perf_counter()
        ranks.sum_gradients(model.grads, 0.0, be)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    p.add_argument("--repeats", type=int, default=20, help="timed reductions (median)")
    p.add_argument("--backend", default="numba")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    ranks = world()
    if ranks.size > 1:  # a rank started by the driver below
        limit_threads(ranks.default_threads())
        rate = step_rate(ranks, args)
        reduce_s = reduction_seconds(ranks, args.repeats)
        if ranks.is_root:
            print(json.dumps({"images_per_s": rate, "reduce_s": reduce_s, "threads": ranks.default_threads()}))
        return
    load_before = os.getloadavg()
    limit_threads(cores())
    one_before = step_rate(ranks, args)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    r = subprocess.run([str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(args.ranks), sys.executable,
                        __file__, *sys.argv[1:]], capture_output=True, text=True, check=True)
    many = json.loads(r.stdout.strip().splitlines()[-1])
    one_after = step_rate(ranks, args)
    load_after = os.getloadavg()
    result = {"cores": cores(), "batch": args.batch, "size": args.size, "backend": args.backend,
              "one_process_images_per_s": [one_before, one_after], "ranks": args.ranks,
              "ranks_images_per_s": many["images_per_s"], "threads_per_rank": many["threads"],
              "reduce_ms": 1e3 * many["reduce_s"], "gradient_mb": 1.940817 * 4, "loadavg": [load_before, load_after]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({cores()} cores)")
    print(f"1 process x {cores()} threads : {one_before:.2f} img/s (before), {one_after:.2f} img/s (after)")
    print(f"{args.ranks} ranks x {many['threads']} thread(s)  : {many['images_per_s']:.2f} img/s")
    print(f"one reduction of 7.8 MB of gradients on {args.ranks} ranks: {1e3 * many['reduce_s']:.1f} ms (median)")


if __name__ == "__main__":
    main()
