"""Digests of a few training steps, to show that a change to the kernels or the model keeps every
result bit for bit: run it on two checkouts and compare the lines.

    PYTHONPATH=. python benchmarks/step_digest.py > new.txt
    (cd old-checkout && PYTHONPATH=. python /path/to/step_digest.py) > old.txt && diff old.txt new.txt

For each backend, dtype and base width: 3 steps (zero_grad, forward, sigmoid+BCE, backward, Adam) of
a depth-4 U-Net on a fixed random 2x1x64x64 batch; one line with the sha256 of the losses, the last
logits, every gradient and every parameter after the steps. ``--small-chunks`` shrinks the numba
backend's chunks (``threads.COL_ELEMS``, ``threads.ELEMS``) so that every op runs many chunks and
the chunk-order reductions are exercised even at this size.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from minunet.kernels.numba import threads
from minunet.model import UNet
from minunet.optim import Adam


def digest(backend, dtype, base, steps=3, size=64, batch=2):
    model = UNet(1, base, 4, backend=backend, dtype=dtype, seed=0)
    be = model.backend
    rng = np.random.default_rng(1)
    x = rng.random((batch, 1, size, size)).astype(dtype)
    y = (rng.random(x.shape) > 0.5).astype(dtype)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    h = hashlib.sha256()
    for _ in range(steps):
        model.zero_grad()
        logits = model.forward(x)
        loss, dz = be.sigmoid_bce(logits, y)
        model.backward(dz)
        opt.step()
        h.update(np.float64(loss).tobytes())
    h.update(np.ascontiguousarray(be.to_host(logits)).tobytes())
    for name in sorted(model.params):
        h.update(np.ascontiguousarray(be.to_host(model.grads[name])).tobytes())
        h.update(np.ascontiguousarray(be.to_host(model.params[name])).tobytes())
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-chunks", action="store_true")
    ap.add_argument("--backends", default="numba,numpy")
    a = ap.parse_args(argv)
    if a.small_chunks:
        threads.COL_ELEMS, threads.ELEMS = 1 << 12, 1 << 10
    for backend in a.backends.split(","):
        for dtype in ("float32", "float64"):
            for base in (4, 8, 16):
                print(f"{backend} {dtype} base {base}: {digest(backend, dtype, base)}", flush=True)


if __name__ == "__main__":
    main()
