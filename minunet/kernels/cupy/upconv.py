"""2x2 transposed convolution, stride 2, on NHWC device arrays, written with the skip connection
into one buffer: one GEMM and a permutation.

The 2x2 output blocks do not overlap, so the forward is one GEMM followed by a
gather that places each GEMM column in its block, in the channels after the
skip's (the same kernel copies the skip into the first channels); the backward
is the inverse permutation from those channels followed by GEMMs, and the
skip's gradient is the other channels of dy, a view.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minunet.kernels.cupy.cuda import CudaKernel


class UpConvCache(NamedTuple):
    x: Any  # (N,H,W,Cin)
    w: Any  # (Cin,Cout,2,2)
    cs: int  # the skip's channels: the first cs channels of the output


class UpConvOps:
    """upconv2x2_forward / upconv2x2_backward. A part of ``CupyBackend`` (backend.py), which
    provides ``xp``, ``dtype``, ``_launch``, ``_c`` and ``_ones_vec``."""

    EXPAND = CudaKernel("upconv_expand", r"""
// Up-conv forward, second half, and the skip: T (N*H*W, 4*Co) holds sum_c x[n,h,w,c] * w[c,o,i,j] at
// column (i*2+j)*Co + o; y is (N,2H,2W,Cs+Co), skip (N,2H,2W,Cs).
//   y[n,2h+i,2w+j,c]    = skip[n,2h+i,2w+j,c]                     c < Cs
//   y[n,2h+i,2w+j,Cs+o] = T[(n,h,w), (i*2+j)*Co + o] + b[o]
extern "C" __global__ void upconv_expand(const real* __restrict__ T, const real* __restrict__ b,
                                         const real* __restrict__ skip, real* __restrict__ y,
                                         int N, int H, int W, int Cs, int Co) {
    const int H2 = 2 * H, W2 = 2 * W;
    const long long total = (long long)N * H2 * W2 * (Cs + Co);
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, H2, W2, Cs + Co);
        if (e.c < Cs) {
            y[idx] = skip[nhwc_flat(e.n, e.h, e.w, e.c, H2, W2, Cs)];
        } else {
            const int o = e.c - Cs, t = ((e.h & 1) << 1) | (e.w & 1);
            y[idx] = T[nhwc_flat(e.n, e.h >> 1, e.w >> 1, t * Co + o, H, W, 4 * Co)] + b[o];  // T as (N,H,W,4Co)
        }
    }
}
""")

    def upconv2x2_forward(self, x, w, b, skip):
        """y[n,2h+i,2w+j,:Cs] = skip[n,2h+i,2w+j];  y[n,2h+i,2w+j,Cs+o] = b[o] + sum_c x[n,h,w,c] * w[c,o,i,j].

        x (N,H,W,Cin), w (Cin,Cout,2,2), skip (N,2H,2W,Cs) -> y (N,2H,2W,Cs+Cout). The 2x2
        output blocks do not overlap, so the up-conv is one GEMM, T (N*H*W, 4*Cout) =
        X (N*H*W, Cin) @ Wr with Wr[c,(i*2+j)*Cout+o] = w[c,o,i,j], then a gather that places
        each T column in its block after the skip's channels, and copies the skip.
        """
        xp = self.xp
        x, w, b, skip = self._c(x), self._c(w), self._c(b), self._c(skip)
        N, H, W, Cin = x.shape
        Cout, Cs = w.shape[1], skip.shape[3]
        wr = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout))
        t = xp.matmul(x.reshape(N * H * W, Cin), wr)  # (NHW, 4*Cout)
        y = xp.empty((N, 2 * H, 2 * W, Cs + Cout), dtype=self.dtype)
        i32 = np.int32
        self._launch(self.EXPAND, y.size, t, b, skip, y, i32(N), i32(H), i32(W), i32(Cs), i32(Cout))
        return y, UpConvCache(x, w, Cs)

    COLLECT = CudaKernel("upconv_collect", r"""
// The inverse permutation, from the up-conv's channels of dy (N,2H,2W,Cs+Co):
//   dT[(n,h,w), (i*2+j)*Co + o] = dy[n, 2h+i, 2w+j, Cs+o].
extern "C" __global__ void upconv_collect(const real* __restrict__ dy, real* __restrict__ dT,
                                          int N, int H, int W, int Cs, int Co) {
    const long long total = (long long)N * H * W * 4 * Co;
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, H, W, 4 * Co);  // dT as (N,H,W,4Co)
        const int t = e.c / Co, o = e.c % Co;
        dT[idx] = dy[nhwc_flat(e.n, 2 * e.h + (t >> 1), 2 * e.w + (t & 1), Cs + o, 2 * H, 2 * W, Cs + Co)];
    }
}
""")

    def upconv2x2_backward(self, dy, cache):
        """dy (N,2H,2W,Cs+Cout) -> (dx (N,H,W,Cin), dw (Cin,Cout,2,2), db (Cout), dskip (N,2H,2W,Cs)).

            dT[(n,h,w),(i*2+j)*Cout+o] = dy[n,2h+i,2w+j,Cs+o]    (a gather: the inverse permutation)
            dx (NHW,Cin)   = dT @ Wr^T    = sum_{o,i,j} dy[n,2h+i,2w+j,Cs+o] * w[c,o,i,j]
            dWr (Cin,4Cout) = X^T @ dT    -> dw[c,o,i,j] = sum_{n,h,w} x[n,h,w,c] * dy[n,2h+i,2w+j,Cs+o]
            db (Cout)      = 1 @ dT, summed over the 4 taps (i, j)
            dskip          = dy[..., :Cs], a view
        """
        xp = self.xp
        x, w, cs = cache
        dy = self._c(dy)
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        M = N * H * W
        dt = xp.empty((M, 4 * Cout), dtype=self.dtype)
        i32 = np.int32
        self._launch(self.COLLECT, dt.size, dy, dt, i32(N), i32(H), i32(W), i32(cs), i32(Cout))
        wr = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout))
        dx = xp.matmul(dt, wr.T).reshape(N, H, W, Cin)
        dwr = xp.matmul(x.reshape(M, Cin).T, dt)  # (Cin, 4*Cout)
        dw = xp.ascontiguousarray(dwr.reshape(Cin, 2, 2, Cout).transpose(0, 3, 1, 2))
        db = xp.matmul(self._ones_vec(M), dt).reshape(4, Cout).sum(axis=0)
        return dx, dw, db, dy[..., :cs]

    def skip_part(self, y, skip):
        """[skip | up] (N,2H,2W,Cs+Cout) -> its skip channels (N,2H,2W,Cs), a view (conv2d_backward
        makes its ReLU mask contiguous before a kernel reads it)."""
        return y[..., : skip.shape[-1]]
