"""k x k convolution (k odd, zero padding p = k//2, stride 1) as k*k GEMMs on shifted views of
one padded copy of the input: no im2col (the numba backend's path for the wide, low-resolution
U-Net levels; the rule in ``conv.use_shifted``).

The layout. N images of H x W pixels with C channels go into one flat (T, C) array B, zero
except for the pixels:

    S = W + p                    row stride in pixels: each row is p zeros, then the W pixels
    R = H + p                    image stride in rows: each image is p zero rows, then its H rows
    B[p*(S+1) + (n*R + h)*S + w] = x[n, h, w, :]
    T = N*R*S + (k-1)*(S+1)      (the last image's bottom padding and the last taps' reach)

The zeros are shared: a row's right padding is the next row's left padding, and an image's
bottom padding the next image's top padding. So B is only (1 + p/H)(1 + p/W) times x, where
im2col's columns are k*k times x.

The products. Number the outputs q = (n*R + h)*S + w, q in [0, M) with M = N*R*S: the output
pixel (n, h, w) for h < H and w < W, a "garbage" output otherwise (p per row, p rows per image:
6% of M at 32x32, 13% at 16x16, computed and dropped). Tap (i, j) of output q reads
xpad[n, h+i, w+j] = B[q + i*S + j], so for every tap the inputs of all outputs are one
contiguous (M, C) view of B, and

    O[q]  = sum_{i,j} B[q + i*S + j] @ Wt[i, j]          O (M, Cout), Wt (k, k, C, Cout)

is k*k plain GEMMs with the full pixel count as rows (im2col at 16x16 and 32x32 pixels ran one
GEMM per image row or two: 16-48 rows against a 9216 x 1024 weight matrix, 35-55% of the sgemm
ceiling). The weight gradient is k*k GEMMs the other way round, with dz in the same layout
(zero at the garbage outputs, so they add nothing):

    dW[i, j] = sum_q B[q + i*S + j]^T dz[q]               (C, M) @ (M, Cout)

and the input gradient is the forward of dz's layout with the flipped kernel.

Threads and determinism: the forward cuts O into chunks of whole padded rows, each summing its
taps in tap order in per-thread scratch and writing its real outputs to y; the weight gradient
runs one chunk per (tap, block of output columns). No chunk adds to another's output, the
boundaries depend on the shapes alone, and a chunk's BLAS runs on one thread (``threads.run``),
so the same inputs give the same bytes on any number of threads.

NaN and inf (the rule in ``kernels/base.py``): the forward and the input gradient multiply the
zero padding as im2col does. The weight gradient would also multiply x by the zero gradient of
the garbage outputs, so a non-finite pixel in the border columns would make NaN weight-gradient
entries that the reference leaves finite: ``to_layout`` reports whether x is finite, and
``conv.conv2d_backward`` takes the im2col path for a non-finite x (only a diverging run has one).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from minunet.kernels.numba import threads
from minunet.kernels.numba.threads import JIT


def geometry(N, H, W, k):
    """(p, S, R, M, T) of the layout for N images of H x W and a k x k kernel."""
    p = k // 2
    S, R = W + p, H + p
    M = N * R * S
    return p, S, R, M, M + (k - 1) * (S + 1)


@njit(**JIT)
def _to_layout(x, p, S, R, B, n0, n1):
    """B's rows of images n0..n1-1 (data and their top and left zero padding) from x (N,H,W,C);
    returns whether every value copied is finite ((v - v) == 0 is false for NaN and inf)."""
    N, H, W, C = x.shape
    base = p * (S + 1)
    finite = True
    for n in range(n0, n1):
        for r in range(n * R * S, n * R * S + base):  # top padding rows, and the first row's left zeros
            for c in range(C):
                B[r, c] = 0
        for h in range(H):
            row = base + (n * R + h) * S
            for w in range(W):
                for c in range(C):
                    v = x[n, h, w, c]
                    B[row + w, c] = v
                    finite &= (v - v) == 0
            for w in range(W, S if h < H - 1 else W):  # right zeros = the next row's left zeros (the
                for c in range(C):  # last row's are the next image's top padding, or B's tail)
                    B[row + w, c] = 0
    return finite


def to_layout(x, k):
    """(B, finite): x (N,H,W,C) in the shifted layout for a k x k kernel, and whether x is finite."""
    N, H, W, C = x.shape
    p, S, R, M, T = geometry(N, H, W, k)
    B = np.empty((T, C), x.dtype)
    B[M:] = 0  # after the last image: its bottom padding and the taps' reach
    flags = threads.run(lambda n0, n1: _to_layout(x, p, S, R, B, n0, n1), threads.ranges(N, 1))
    return B, all(flags)


def row_chunks(total, row_elems):
    """The forward's chunks: ranges of whole padded rows (of total = N*R) whose outputs fill about
    threads.COL_ELEMS values (row_elems per row), in an even number of near-equal chunks when there
    are two rows or more (two threads share them evenly), by the shape alone."""
    per = max(1, threads.COL_ELEMS // row_elems)
    n = -(-total // per)
    if n % 2 and total > 1:
        n = n + 1 if n < total else n - 1  # one more chunk, or (one row each already) one fewer
    bounds = [i * total // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@njit(**JIT)
def _epilogue(acc, r0, r1, S, R, b, relu, y):
    """y[n, h, :, :] from acc ((r1-r0)*S, C), the outputs of padded rows r0..r1-1: row r is image
    r // R, row r % R, a real row when that is < H, whose first W outputs are real; + b (length 0:
    none), then max(., 0) when relu (NaN stays NaN)."""
    N, H, W, C = y.shape
    has_b = b.shape[0] > 0
    for r in range(r0, r1):
        n = r // R
        h = r - n * R
        if h >= H:
            continue
        base = (r - r0) * S
        for w in range(W):
            for c in range(C):
                v = acc[base + w, c]
                if has_b:
                    v += b[c]
                if relu and v < 0:
                    v = 0
                y[n, h, w, c] = v


def conv_layout(B, wt, S, R, b, relu, y):
    """y (N,H,W,Cout) = the real outputs of O = sum_{i,j} B[i*S+j : i*S+j+M] @ wt[i, j] (+ b, then
    ReLU), the taps added in order (i, j). B (T, C) in the layout, wt (k, k, C, Cout), b (Cout,) or
    None. Per chunk of padded rows, O's rows go to per-thread scratch (two buffers of about 2 MB
    each in float32, in cache) and straight on to y: O is never whole in memory."""
    N, H, W, Cout = y.shape
    k = wt.shape[0]
    bb = np.zeros(0, y.dtype) if b is None else b
    relu = bool(relu)

    def chunk(r0, r1):
        lo, hi = r0 * S, r1 * S
        acc = threads.tls_buffer((hi - lo, Cout), B.dtype, "acc")
        tmp = threads.tls_buffer((hi - lo, Cout), B.dtype, "tmp")
        for t in range(k * k):
            i, j = divmod(t, k)
            a = B[lo + i * S + j : hi + i * S + j]
            if t == 0:
                np.dot(a, wt[i, j], out=acc)
            else:
                np.dot(a, wt[i, j], out=tmp)
                acc += tmp
        _epilogue(acc, r0, r1, S, R, bb, relu, y)

    threads.run(chunk, row_chunks(N * R, S * Cout))


def conv(x, wt, b, relu, y):
    """y (N,H,W,Cout) = conv(x, wt) (+ b, then ReLU): x (N,H,W,C), wt (k,k,C,Cout), b (Cout,) or None."""
    N, H, W, _ = x.shape
    k = wt.shape[0]
    _, S, R, _, _ = geometry(N, H, W, k)
    B, _ = to_layout(x, k)
    conv_layout(B, wt, S, R, b, relu, y)


def column_blocks(Cout, k):
    """The weight gradient's chunks: (tap, column range); Cout in two blocks when it is even and at
    least 32, so that the k*k taps make an even number of chunks."""
    ncol = 2 if Cout >= 32 and Cout % 2 == 0 else 1
    cols = threads.ranges(Cout, Cout // ncol)
    return [(t, c0, c1) for t in range(k * k) for c0, c1 in cols]


def weight_grad(Bx, Bdz, k, S, M):
    """dW (k, k, C, Cout), dW[i, j] = Bx[i*S+j : i*S+j+M]^T @ dz, dz = Bdz's rows from p*(S+1) on
    (dz in the output layout: zero at the garbage outputs)."""
    C, Cout = Bx.shape[1], Bdz.shape[1]
    p = k // 2
    dz = Bdz[p * (S + 1) : p * (S + 1) + M]
    dW = np.empty((k, k, C, Cout), Bx.dtype)

    def chunk(t, c0, c1):
        i, j = divmod(t, k)
        dW[i, j, :, c0:c1] = Bx[i * S + j : i * S + j + M].T @ dz[:, c0:c1]

    threads.run(chunk, column_blocks(Cout, k))
    return dW
