"""2x2 transposed convolution, stride 2 (the up-conv), on NHWC activations, written with the skip
connection into one buffer.

Each input pixel paints its own 2x2 output block, so per chunk of input rows
the op is one GEMM, Z (rows*W, 4*Cout) = X @ Wm, and a scatter of Z's
columns to the 2x2 blocks, into the channels after the skip's (channels-last:
each output pixel is Cs skip values, then Cout up-conv values). The backward
gathers the blocks back from those channels (the adjoint) and runs the GEMMs
of the backward; the skip's gradient is the other channels of dy, a view.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from minunet.kernels.numba import threads
from minunet.kernels.numba.conv import colsum
from minunet.kernels.numba.threads import JIT


class UpConvCache(NamedTuple):
    x: np.ndarray  # (N,H,W,Cin) NHWC
    w: np.ndarray  # (Cin,Cout,2,2) PyTorch layout
    cs: int  # the skip's channels: the first cs channels of the output


def _upconv_wm(w, dtype):
    """Wm (Cin, 4*Cout), Wm[c, (i*2+j)*Cout + o] = w[c,o,i,j]."""
    Cin, Cout = w.shape[:2]
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout), dtype=dtype)


@njit(**JIT)
def _upconv_scatter(z, b, skip, y, r0):
    """For input rows r = n*H + h in [r0, r0 + rows), the output pixels (n, 2h+i, 2w+j):
        y[n, 2h+i, 2w+j, c]    = skip[n, 2h+i, 2w+j, c]                       c < Cs
        y[n, 2h+i, 2w+j, Cs+o] = z[(r-r0)*W + w, (i*2+j)*Cout + o] + b[o]

    z (rows*W, 4*Cout); skip (N,2H,2W,Cs); y (N,2H,2W,Cs+Cout)."""
    N, H2, W2, Ct = y.shape
    Cs = skip.shape[3]
    Co = Ct - Cs
    H, W = H2 // 2, W2 // 2
    for rr in range(z.shape[0] // W):
        r = r0 + rr
        n = r // H
        h = r - n * H
        for i in range(2):
            for w in range(W):
                zr = rr * W + w
                for j in range(2):
                    for c in range(Cs):
                        y[n, 2 * h + i, 2 * w + j, c] = skip[n, 2 * h + i, 2 * w + j, c]
                    zc = (i * 2 + j) * Co
                    for o in range(Co):
                        y[n, 2 * h + i, 2 * w + j, Cs + o] = z[zr, zc + o] + b[o]


def upconv2x2_forward(x, w, b, skip):
    """y[n,2h+i,2w+j,:Cs] = skip[n,2h+i,2w+j];  y[n,2h+i,2w+j,Cs+o] = b[o] + sum_c x[n,h,w,c] * w[c,o,i,j].

    x (N,H,W,Cin) NHWC, w (Cin,Cout,2,2), skip (N,2H,2W,Cs) -> y (N,2H,2W,Cs+Cout). Per chunk
    of rows: Z (rows*W, 4*Cout) = X @ Wm, then one pass over the chunk's output pixels that
    copies the skip and scatters the 2x2 blocks of Z after it."""
    x, skip = np.ascontiguousarray(x), np.ascontiguousarray(skip)
    N, H, W, Cin = x.shape
    Cout, Cs = w.shape[1], skip.shape[3]
    wm = _upconv_wm(w, x.dtype)
    b = np.ascontiguousarray(b, dtype=x.dtype)
    x2d = x.reshape(N * H * W, Cin)
    y = np.empty((N, 2 * H, 2 * W, Cs + Cout), x.dtype)
    per = max(1, threads.ELEMS // (W * 4 * Cout))

    def chunk(r0, r1):
        z = threads.tls_buffer((per * W, 4 * Cout), x.dtype)[: (r1 - r0) * W]
        np.dot(x2d[r0 * W : r1 * W], wm, out=z)
        _upconv_scatter(z, b, skip, y, r0)

    threads.run(chunk, threads.ranges(N * H, per))
    return y, UpConvCache(x, w, Cs)


@njit(**JIT)
def _upconv_gather(dy, cs, dz, r0):
    """dz[(r-r0)*W + w, (i*2+j)*Cout + o] = dy[n, 2h+i, 2w+j, cs+o]: the adjoint of the scatter.

    dy (N,2H,2W,cs+Cout); dz (rows*W, 4*Cout)."""
    N, H2, W2, Ct = dy.shape
    Co = Ct - cs
    H, W = H2 // 2, W2 // 2
    for rr in range(dz.shape[0] // W):
        r = r0 + rr
        n = r // H
        h = r - n * H
        for w in range(W):
            zr = rr * W + w
            for i in range(2):
                for j in range(2):
                    zc = (i * 2 + j) * Co
                    for o in range(Co):
                        dz[zr, zc + o] = dy[n, 2 * h + i, 2 * w + j, cs + o]


def upconv2x2_backward(dy, cache):
    """dZ[(n,h,w),(i,j,o)] = dy[n,2h+i,2w+j,Cs+o];  dx = dZ @ Wm^T;  dWm = X^T @ dZ;
    db[o] = sum_{n,y,x} dy[n,y,x,Cs+o];  dskip = dy[..., :Cs], a view.
    dy (N,2H,2W,Cs+Cout) -> (dx (N,H,W,Cin), dw (Cin,Cout,2,2), db, dskip (N,2H,2W,Cs))."""
    x, w, cs = cache
    N, H, W, Cin = x.shape
    Cout = w.shape[1]
    wmT = _upconv_wm(w, x.dtype).T
    dy = np.ascontiguousarray(dy)
    x2d = x.reshape(N * H * W, Cin)
    dx = np.empty((N, H, W, Cin), x.dtype)
    dx2d = dx.reshape(N * H * W, Cin)
    per = max(1, threads.ELEMS // (W * 4 * Cout))

    def chunk(r0, r1):
        lo, hi = r0 * W, r1 * W
        dz = threads.tls_buffer((per * W, 4 * Cout), x.dtype)[: hi - lo]
        _upconv_gather(dy, cs, dz, r0)
        np.dot(dz, wmT, out=dx2d[lo:hi])
        db = np.empty(4 * Cout, np.float64)
        colsum(dz, db)
        return x2d[lo:hi].T @ dz, db

    dwm, db4 = threads.run_sum(chunk, threads.ranges(N * H, per))
    dw = np.ascontiguousarray(dwm.reshape(Cin, 2, 2, Cout).transpose(0, 3, 1, 2)).astype(w.dtype, copy=False)
    db = db4.reshape(4, Cout).sum(axis=0)
    return dx, dw, db.astype(w.dtype), dy[..., :cs]
