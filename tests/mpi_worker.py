"""What test_mpi.py runs on every rank under ``mpiexec -n 2`` (not a test module).

    python mpi_worker.py gradient OUT.npz LOSS          batch_gradient of a fixed 3-image batch
    python mpi_worker.py evaluate DATA MODEL OUT.json   Ranks.evaluate of a checkpoint on DATA
    python mpi_worker.py train CONFIG.json STOP_AT      train(); rank 0 sends itself SIGINT at batch STOP_AT
    python mpi_worker.py fail CONFIG.json               train(); rank 1 raises in its second step

Rank 0 writes the results; the test compares them with one process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

import minunet.train as train_mod
from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, load_arrays
from minunet.distributed import world
from minunet.model import UNet
from minunet.train import TrainConfig, batch_gradient, train


def gradient_batch():
    """A fixed batch of 3 (uneven on 2 ranks: 2 + 1) and a tiny model, the same in every process."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (3, 1, 32, 32)).astype(np.float32)
    y = (rng.uniform(0, 1, (3, 1, 32, 32)) > 0.6).astype(np.float32)
    return UNet(1, 4, 2, backend="numpy", seed=3), x, y


def main(argv):
    ranks = world()
    what = argv[0]
    if what == "gradient":
        model, x, y = gradient_batch()
        loss = batch_gradient(model, argv[2], x, y, ranks)
        if ranks.is_root:
            np.savez(argv[1], loss=np.float64(loss), **{f"grad/{n}": g for n, g in model.grads.items()})
    elif what == "evaluate":
        data = load_arrays(find_data(argv[1], "lung").items(), 32)
        model = load_checkpoint(argv[2]).build_model("numpy")
        res = ranks.evaluate(model, data, batch_size=5)
        if ranks.is_root:
            with open(argv[3], "w") as f:
                json.dump({"summary": res.summary, "per_group": res.per_group, "names": res.names,
                           "dice": res.dice_per_image.tolist()}, f)
    elif what == "train":
        cfg = TrainConfig(**json.loads(open(argv[1]).read()))
        stop_at = int(argv[2])
        batches = []

        def ctrl_c_at(event, **info):  # rank 0 alone gets the signal: the ranks must stop together
            if event == "batch":
                batches.append(1)
                if len(batches) == stop_at:
                    os.kill(os.getpid(), signal.SIGINT)

        result = train(cfg, ctrl_c_at)
        print(f"rank {ranks.rank}: {result.status}", flush=True)
    elif what == "fail":
        cfg = TrainConfig(**json.loads(open(argv[1]).read()))
        real, calls = train_mod.batch_gradient, []

        def failing(*a):
            calls.append(1)
            if ranks.rank == 1 and len(calls) == 2:
                raise RuntimeError("planted failure on rank 1")
            return real(*a)

        train_mod.batch_gradient = failing
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
