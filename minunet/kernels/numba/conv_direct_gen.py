"""Writes ``conv_direct_kernels.py``: the direct convolution kernels, register blocks unrolled.

The direct kernels keep a block of outputs in registers while they loop over
taps and input channels (see ``conv.py``). Numba has no fixed-size register
arrays, so the block is written out as scalar variables, ``a0_0`` to
``a3_15``, with one line per variable and per update: hundreds of lines that
differ only in their indices. This file writes them from three templates
(``fwd_source``, ``dw_source`` for 4 and for 1 input channels per block); the
output is checked in beside it, so a reader can read every line that runs,
and ``tests/test_numba_direct.py`` checks that it is current. After editing a
template, rewrite it with

    python -m minunet.kernels.numba.conv_direct_gen
"""

from __future__ import annotations

from pathlib import Path

# The forward kernels (also the input gradient): name -> pixels per register block. 4 x 16
# accumulators fill half of AVX2's 16 vector registers (6 pixels were slower there); AVX-512 has
# 32, and with only 4 accumulators its FMAs wait on each other (latency 4, two per cycle), so the
# 8-pixel block is for AVX-512 machines. (One kernel with blocks of 8 and then 4 was measured 4x
# slower than either alone: LLVM's SLP vectoriser left both blocks half scalar.)
FWD_BLOCKS = {"conv_direct": 4, "conv_direct8": 8}
OB = 16  # output channels per register block: one AVX-512 register of float32 (two AVX2)
# input channels per register block of the weight-gradient kernels (Cin % CB == 0); 16 and 8: AVX-512
DW_CB = (16, 8, 4, 1)

OUTPUT = Path(__file__).with_name("conv_direct_kernels.py")


def lines(ind, fmt, **ranges):
    """One line per combination of the ranges' values, e.g. lines(4, "a{q}_{o} = 0", q=2, o=3)."""
    combos = [{}]
    for key, n in ranges.items():
        combos = [{**c, key: v} for c in combos for v in range(n)]
    return "\n".join(" " * ind + fmt.format(**c) for c in combos)


def fwd_source(name, PB, OB):
    """Source of a forward kernel (also the input gradient, with the flipped kernel): register
    blocks of PB pixels x OB channels."""
    return f'''
@njit(**JIT)
def {name}(x, wt, b, relu, y, r0, r1):
    """y = conv(x, wt) + b (then ReLU) for image rows r = n*H + h in [r0, r1).

    x (N,H,W,Cin) NHWC; wt (k,k,Cin,Cout), wt[i,j,c,o] = w[o,c,i,j]; b (Cout,);
    y (N,H,W,Cout); Cout a multiple of {OB}. For output pixel (h, w) and channel o:
        y[n,h,w,o] = b[o] + sum_{{i,j,c}} xpad[n, h+i-p, w+j-p, c] * wt[i,j,c,o],  p = k//2.
    Register block: {PB} neighbouring pixels x {OB} channels (a{{q}}_{{o}}); per (tap, c)
    one row wt[i,j,c,ob:ob+{OB}] (u{{o}}) times {PB} input values (v{{q}}). The blocks tile
    the row's interior [p, W-p) from the left; the last one is moved left to end at
    W-p, computing a few pixels a second time (the same sums in the same order, so the
    same values). Pixels whose taps leave the image (the first and last p of a row, or
    a whole row narrower than a block) take the one-pixel loop with the tap range
    clipped; rows outside the image are skipped. Every output is summed in the same
    order (i, j, c) whatever its path, so the block size never changes a result."""
    N, H, W, Cin = x.shape
    k = wt.shape[0]
    Cout = wt.shape[3]
    p = k // 2
    xf = x.reshape(x.size)
    wf = wt.reshape(wt.size)
    yf = y.reshape(y.size)
    zero = np.zeros(1, y.dtype)[0]
    blocks = W - 2 * p >= {PB}
{lines(4, "K{o} = np.uint64({o})", o=OB)}
{lines(4, "Q{q} = np.uint64({q} * Cin)", q=PB)}
{lines(4, "R{q} = np.uint64({q} * Cout)", q=PB)}
    for r in range(r0, r1):
        n = r // H
        h = r - n * H
        for ob in range(0, Cout, {OB}):
            w0 = 0
            while w0 < W:
                if blocks and p <= w0 < W - p:
                    w0 = min(w0, W - p - {PB})
{lines(20, "a{q}_{o} = b[ob + {o}]", q=PB, o=OB)}
                    for i in range(k):
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        for j in range(k):
                            xb = ((n * H + hs) * W + w0 + j - p) * Cin
                            wb = (i * k + j) * Cin * Cout + ob
                            for c in range(Cin):
                                wc = np.uint64(wb + c * Cout)
                                xc = np.uint64(xb + c)
{lines(32, "u{o} = wf[wc + K{o}]", o=OB)}
{lines(32, "v{q} = xf[xc + Q{q}]", q=PB)}
{lines(32, "a{q}_{o} += v{q} * u{o}", q=PB, o=OB)}
                    yb = np.uint64((r * W + w0) * Cout + ob)
                    if relu:
{lines(24, "yf[yb + R{q} + K{o}] = zero if a{q}_{o} < zero else a{q}_{o}", q=PB, o=OB)}
                    else:
{lines(24, "yf[yb + R{q} + K{o}] = a{q}_{o}", q=PB, o=OB)}
                    w0 += {PB}
                else:
{lines(20, "a{o} = b[ob + {o}]", o=OB)}
                    jlo = max(0, p - w0)
                    jhi = min(k, W - w0 + p)
                    for i in range(k):
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        for j in range(jlo, jhi):
                            xb = ((n * H + hs) * W + w0 + j - p) * Cin
                            wb = (i * k + j) * Cin * Cout + ob
                            for c in range(Cin):
                                wc = np.uint64(wb + c * Cout)
                                v = xf[xb + c]
{lines(32, "a{o} += v * wf[wc + K{o}]", o=OB)}
                    yb = np.uint64((r * W + w0) * Cout + ob)
                    if relu:
{lines(24, "yf[yb + K{o}] = zero if a{o} < zero else a{o}", o=OB)}
                    else:
{lines(24, "yf[yb + K{o}] = a{o}", o=OB)}
                    w0 += 1
'''


def dw_source(CB, OB):
    """Source of conv_dw_direct{CB} (the weight gradient, CB input channels per register block)."""
    return f'''
@njit(**JIT)
def conv_dw_direct{CB}(x, dz, k, dw, r0, r1):
    """dw += the weight gradient of image rows r = n*H + h in [r0, r1).

    x (N,H,W,Cin), dz (N,H,W,Cout); dw (k,k,Cin,Cout) accumulated in place:
        dw[i,j,c,o] += sum_{{r0 <= n*H+h < r1, w}} xpad[n, h+i-p, w+j-p, c] * dz[n,h,w,o].
    Register block: {CB} input channel(s) x {OB} output channels of one tap (a{{q}}_{{o}}),
    summed over the chunk's pixels in order (h, w); per pixel one row dz[.., ob:ob+{OB}]
    (u{{o}}) times {CB} input value(s) (v{{q}}). Cin a multiple of {CB}, Cout of {OB}."""
    N, H, W, Cin = x.shape
    Cout = dz.shape[3]
    p = k // 2
    xf = x.reshape(x.size)
    zf = dz.reshape(dz.size)
    dwf = dw.reshape(dw.size)
{lines(4, "K{o} = np.uint64({o})", o=OB)}
{lines(4, "Q{q} = np.uint64({q})", q=CB)}
{lines(4, "R{q} = np.uint64({q} * Cout)", q=CB)}
    for i in range(k):
        for j in range(k):
            wlo = max(0, p - j)
            whi = min(W, W + p - j)
            for cb in range(0, Cin, {CB}):
                for ob in range(0, Cout, {OB}):
                    db = np.uint64(((i * k + j) * Cin + cb) * Cout + ob)
{lines(20, "a{q}_{o} = dwf[db + R{q} + K{o}]", q=CB, o=OB)}
                    for r in range(r0, r1):
                        n = r // H
                        h = r - n * H
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        xr = ((n * H + hs) * W + j - p) * Cin + cb
                        zr = r * W * Cout + ob
                        for w in range(wlo, whi):
                            xb = np.uint64(xr + w * Cin)
                            zb = np.uint64(zr + w * Cout)
{lines(28, "u{o} = zf[zb + K{o}]", o=OB)}
{lines(28, "v{q} = xf[xb + Q{q}]", q=CB)}
{lines(28, "a{q}_{o} += v{q} * u{o}", q=CB, o=OB)}
{lines(20, "dwf[db + R{q} + K{o}] = a{q}_{o}", q=CB, o=OB)}
'''


HEADER = f'''"""GENERATED by conv_direct_gen.py from its templates: do not edit by hand. Rewrite it with
    python -m minunet.kernels.numba.conv_direct_gen

The direct convolution kernels of the numba backend (called from ``conv.py``,
which compiles them with LLVM's SLP vectoriser on). Each keeps a register
block of accumulators, written out as scalars: a{{q}}_{{o}} for block pixel (or
input channel) q and output channel o, u{{o}} a row of {OB} weights (or of dz),
v{{q}} the input values they multiply. K, Q, R are the in-block offsets, as
uint64 so that Numba emits no negative-index wraparound (which would turn the
vector loads into gathers).
"""

import numpy as np
from numba import njit

OB = {OB}  # output channels per register block: Cout must be a multiple

# fastmath 'contract' only: a*b + c may become one FMA (no reassociation, no other
# fast-math); that choice is fixed once compiled, so results are the same run after run.
JIT = dict(cache=True, fastmath={{"contract"}}, nogil=True)
'''


def source() -> str:
    """The whole text of conv_direct_kernels.py."""
    fwd = "".join("\n" + fwd_source(name, pb, OB) for name, pb in FWD_BLOCKS.items())
    return HEADER + fwd + "".join("\n" + dw_source(cb, OB) for cb in DW_CB)


if __name__ == "__main__":
    OUTPUT.write_text(source())
    print(f"wrote {OUTPUT}")
