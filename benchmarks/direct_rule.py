"""The numba backend's direct-kernel rule, measured: for each 3x3 conv of the U-Net, each part
(forward, input gradient, weight gradient) by the direct kernels and by im2col + BLAS, interleaved
call by call, median ms; a star marks a shape where ``conv.use_direct`` / ``use_direct_dw`` picks
the slower one (the table in benchmarks/README.md, "Direct kernels past 32 channels").

    python benchmarks/direct_rule.py [--repeats 9] [--batch 8] [CIN,COUT,SIZE ...]

Default shapes: every 3x3 conv of the base-16 U-Net at 256x256. float32, the machine's threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from minunet.kernels.numba import conv

BASE16 = [(1, 16, 256), (16, 16, 256), (32, 16, 256), (16, 32, 128), (32, 32, 128), (64, 32, 128), (32, 64, 64),
          (64, 64, 64), (128, 64, 64), (64, 128, 32), (128, 128, 32), (256, 128, 32), (128, 256, 16),
          (256, 256, 16)]


def parts(cin, cout, h, batch, repeats, rng):
    """{part: (direct ms, BLAS ms)} for the parts the direct kernels can take at this shape."""
    x = rng.standard_normal((batch, h, h, cin)).astype(np.float32)
    w = (0.1 * rng.standard_normal((cout, cin, 3, 3))).astype(np.float32)
    dz = rng.standard_normal((batch, h, h, cout)).astype(np.float32)
    y = np.empty((batch, h, h, cout), np.float32)
    dx = np.empty((batch, h, h, cin), np.float32)
    P = batch * h * h
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (k,k,Cin,Cout), as conv2d_forward
    wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))  # (k,k,Cout,Cin), as conv2d_backward
    b, b_in, dz2 = np.zeros(cout, np.float32), np.zeros(cin, np.float32), np.empty((P, cout), np.float32)

    def fwd(direct):
        if direct:
            conv._conv_direct_rows(x, wt, b, True, y)
        else:
            conv._conv_rows(x, wt.reshape(9 * cin, cout), 3, b, True, y.reshape(P, cout))

    def dxf(direct):
        if direct:
            conv._conv_direct_rows(dz, wflip, b_in, False, dx)
        else:
            conv._conv_rows(dz, wflip.reshape(9 * cout, cin), 3, None, False, dx.reshape(P, cin))

    def dwf(direct):
        conv.direct_force = direct
        try:
            conv._conv_grads(x, dz.reshape(P, cout), y.reshape(P, cout), 3, dz2)
        finally:
            conv.direct_force = None

    out = {}
    for part, fn, fits in (("fwd", fwd, cout % conv.OB == 0), ("dx", dxf, cin % conv.OB == 0),
                           ("dw", dwf, cout % conv.OB == 0)):
        if not fits:
            continue
        fn(True), fn(False)  # compile, warm up
        times = {True: [], False: []}
        for _ in range(repeats):
            for direct in (True, False):
                t = time.perf_counter()
                fn(direct)
                times[direct].append((time.perf_counter() - t) * 1e3)
        out[part] = (statistics.median(times[True]), statistics.median(times[False]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="CIN,COUT,SIZE (default: the base-16 U-Net's 3x3 convs)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or BASE16
    rng = np.random.default_rng(0)
    print(f"conv3x3 parts, direct vs im2col + BLAS, ms (median of {args.repeats}, interleaved), batch {args.batch}; "
          "* = the rule picks the slower")
    for cin, cout, h in shapes:
        rule = dict(fwd=conv.use_direct(cin, cout, 3, h), dx=conv.use_direct(cout, cin, 3, h),
                    dw=conv.use_direct_dw(cin, cout, 3))
        cells = []
        for part, (d, blas) in parts(cin, cout, h, args.batch, args.repeats, rng).items():
            star = "*" if (d < blas) != rule[part] else " "
            cells.append(f"{part} direct {d:7.1f} blas {blas:7.1f} {star}")
        print(f"{cin:4d}->{cout:<4d} @{h:<4d} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
