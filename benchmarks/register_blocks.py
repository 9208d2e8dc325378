"""The direct kernels' register blocks, measured: each forward kernel (4 or 8 pixels x 16 outputs)
and each weight-gradient kernel (4, 8 or 16 input channels x 16 outputs) alone, on the same
inputs, median ms, and whether they give the same bytes (they must: every output is summed in the
same order whatever the block). The table in benchmarks/README.md, "AVX-512 register blocks".

    python benchmarks/register_blocks.py [--repeats 9] [--batch 8] [--extra 6,12,16] [CIN,COUT,SIZE ...]

--extra also generates forward kernels with those pixel counts (``conv_direct_gen.fwd_source``),
compiled in a temporary folder, for the comparison only. float32, the machine's threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minunet.kernels.numba import conv, conv_direct_gen, threads
from minunet.kernels.numba import conv_direct_kernels as kernels

SHAPES = [(16, 16, 256), (32, 16, 256), (16, 32, 128), (32, 32, 128), (32, 64, 64), (64, 64, 64), (64, 32, 128),
          (128, 64, 64)]


def median_ms(fn, repeats):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def extra_kernels(pixels):
    """{name: kernel} of forward kernels with these pixel blocks, generated into a temporary module."""
    if not pixels:
        return {}
    src = conv_direct_gen.HEADER + "".join(conv_direct_gen.fwd_source(f"conv_p{pb}", pb, kernels.OB)
                                           for pb in pixels)
    path = Path(tempfile.mkdtemp()) / "extra_direct_kernels.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("extra_direct_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {f"{pb} px": getattr(module, f"conv_p{pb}") for pb in pixels}


def measure(cin, cout, size, n, fwd, dws, repeats, rng):
    """One shape: (cells of "part name ms", whether every forward and every weight-gradient kernel
    gave the bytes of the first)."""
    x = rng.standard_normal((n, size, size, cin)).astype(np.float32)
    wt = (0.1 * rng.standard_normal((3, 3, cin, cout))).astype(np.float32)
    b = np.zeros(cout, np.float32)
    dz = rng.standard_normal((n, size, size, cout)).astype(np.float32)
    rows = threads.ranges(n * size, max(1, threads.ELEMS // (size * max(cin, cout))))
    dw_rows = threads.ranges(n * size, max(1, threads.ELEMS // (size * (cin + cout))))
    cells, ys, dwgrads = [], [], []
    for name, kern in fwd.items():
        y = np.empty((n, size, size, cout), np.float32)
        conv.compile_with_slp(kern, x, wt, b, True, y, 0, 1)

        def forward(kern=kern, y=y):
            threads.run(lambda r0, r1: kern(x, wt, b, True, y, r0, r1), rows)

        cells.append(f"fwd {name} {median_ms(forward, repeats):6.1f}")
        ys.append(y)
    for name, kern in dws.items():
        if cin % int(name.split()[0]):
            continue
        conv.compile_with_slp(kern, x, dz, 3, np.zeros((3, 3, cin, cout), np.float32), 0, 1)

        def dw(kern=kern):
            def chunk(r0, r1):
                part = np.zeros((3, 3, cin, cout), np.float32)
                kern(x, dz, 3, part, r0, r1)
                return (part,)
            return threads.run_sum(chunk, dw_rows)[0]

        cells.append(f"dw {name} {median_ms(dw, repeats):6.1f}")
        dwgrads.append(dw())
    same = all(np.array_equal(ys[0], y) for y in ys) and all(np.array_equal(dwgrads[0], g) for g in dwgrads)
    return cells, same


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--extra", default="", help="more pixel blocks to generate for the forward, e.g. 6,12,16")
    ap.add_argument("shapes", nargs="*", help="CIN,COUT,SIZE (default: the base-16 U-Net's direct convs)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or SHAPES
    fwd = {"4 px": kernels.conv_direct, "8 px": kernels.conv_direct8,
           **extra_kernels([int(v) for v in args.extra.split(",") if v])}
    dws = {"4 ch": kernels.conv_dw_direct4, "8 ch": kernels.conv_dw_direct8, "16 ch": kernels.conv_dw_direct16}
    rng = np.random.default_rng(0)
    print(f"direct kernels alone, ms (median of {args.repeats}), batch {args.batch}; host blocks: {conv.VARIANT}")
    for cin, cout, size in shapes:
        cells, same = measure(cin, cout, size, args.batch, fwd, dws, args.repeats, rng)
        print(f"{cin:4d}->{cout:<4d} @{size:<4d} " + "  ".join(cells) + f"  same bytes: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
