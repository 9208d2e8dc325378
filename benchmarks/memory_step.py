"""Memory of one float32 training step: what the caches keep for the backward, each op's transient
peak, and the process's peak resident memory.

    python benchmarks/memory_step.py --base 64 --batch 4            # cache tally + peak RSS
    python benchmarks/memory_step.py --base 64 --batch 4 --trace    # + per-op peaks (tracemalloc)

One step (zero_grad, forward, sigmoid+BCE, backward, Adam) on a random batch, in this fresh process,
so ``ru_maxrss`` at the end is the step's peak (plus Python, Numba and the libraries; the kernels are
compiled first, on a tiny model, and the peak before the model is printed beside it). ``--trace`` runs the step
under ``tracemalloc`` (NumPy reports its buffers to it) and wraps every backend op: for each call,
the bytes allocated and not yet freed at its peak, above what was live when it started, so the op
that sets the step's peak is named. Tracing slows allocation, not arithmetic; the RSS figure is
taken without it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minunet.footprint import cache_bytes  # noqa: E402
from minunet.model import UNet  # noqa: E402
from minunet.optim import Adam  # noqa: E402

OPS = ("conv2d_forward", "conv2d_backward", "maxpool2x2_forward", "maxpool2x2_backward", "upconv2x2_forward",
       "upconv2x2_backward", "sigmoid_bce")
MiB = 2**20


def trace_ops(be, log):
    """Wrap be's ops (instance attributes shadow the class's) to append (op, input shape, transient
    bytes, peak bytes) per call to log; tracemalloc must be running."""
    for name in OPS:
        if not hasattr(be, name):
            continue
        fn = getattr(be, name)

        def wrapped(*args, _fn=fn, _name=name, **kw):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = _fn(*args, **kw)
            peak = tracemalloc.get_traced_memory()[1]
            shape = tuple(getattr(args[0], "shape", ()))
            log.append((_name, shape, peak - before, peak))
            return out

        setattr(be, name, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--trace", action="store_true", help="per-op transient peaks (tracemalloc)")
    a = ap.parse_args(argv)

    # Compile (or load from Numba's cache) every kernel first, on a tiny model with both conv paths.
    small = UNet(1, 16, 2, backend=a.backend, dtype="float32", seed=0)
    small.backward(small.backend.sigmoid_bce(small.forward(np.zeros((2, 1, 32, 32), np.float32)),
                                             np.zeros((2, 1, 32, 32), np.float32))[1])
    del small
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = UNet(1, a.base, a.depth, backend=a.backend, dtype="float32", seed=0)
    be = model.backend
    rng = np.random.default_rng(0)
    x = rng.random((a.batch, 1, a.size, a.size)).astype(np.float32)
    y = (rng.random(x.shape) > 0.5).astype(np.float32)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    log = []
    if a.trace:
        tracemalloc.start()
        trace_ops(be, log)
    t0 = time.perf_counter()
    model.zero_grad()
    logits = model.forward(x)
    held = cache_bytes(model)
    after_fwd = tracemalloc.get_traced_memory()[0] if a.trace else None
    _, dz = be.sigmoid_bce(logits, y)
    model.backward(dz)
    opt.step()
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"base {a.base} batch {a.batch} depth {a.depth} size {a.size} {be.name}: step {dt:.1f} s")
    print("cache bytes kept for the backward (MiB): "
          + ", ".join(f"{k} {v / MiB:.1f}" for k, v in held.items()))
    if a.trace:
        peak = tracemalloc.get_traced_memory()[1]
        print(f"traced: {after_fwd / MiB:.1f} MiB live after the forward; step peak (the largest op peak) "
              f"{max(p for *_, p in log) / MiB:.1f} MiB, tracemalloc peak since the last op {peak / MiB:.1f} MiB")
        print("largest transient peaks (op, input shape NHWC, MiB above what was live, MiB live at the peak):")
        for name, shape, extra, p in sorted(log, key=lambda r: -r[2])[:12]:
            print(f"  {name:<20} {str(shape):<22} {extra / MiB:8.1f} {p / MiB:8.1f}")
    else:
        print(f"peak RSS {rss:.0f} MiB (peak RSS before the model, after compiling {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
