"""Convolution (3x3 pad 1, or 1x1) on NHWC device arrays: im2col, one cuBLAS GEMM, bias and ReLU.

With NHWC every convolution is ONE plain 2-D GEMM over all pixels of the
batch: the im2col matrix has one row per pixel (n,h,w) and one column per
tap-and-channel (i,j,c), so

    forward     Y (M,Cout)  = COL (M,K) @ Wm^T (K,Cout)       M = N*H*W, K = k*k*Cin
    backward    dWm (Cout,K) = dZ^T (Cout,M) @ COL (M,K)
                dCOL (M,K)   = dZ (M,Cout) @ Wm (Cout,K)       then col2im
                db (Cout)    = 1 (M) @ dZ (M,Cout)

with Wm[o, (i*k+j)*Cin + c] = w[o,c,i,j]. The GEMMs are tall and thin (M is
N*H*W, up to 10^6), which cuBLAS handles well, and there is no per-sample
batching. The tiny weight reshapes to and from Wm are done per call.

Memory: im2col is explicit; to bound its size the batch is processed in chunks
of whole samples whose column matrix fits in ``col_budget_bytes`` (default
2 GiB), and dW is accumulated over the chunks in a fixed order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minunet.kernels.cupy.cuda import CudaKernel
from minunet.kernels.cupy.elementwise import ElementwiseOps


class ConvCache(NamedTuple):
    x: Any  # (N,H,W,Cin) the input
    w: Any  # (Cout,Cin,k,k)
    y: Any  # (N,H,W,Cout) the output after ReLU when fused, else None


class ConvOps:
    """conv2d_forward / conv2d_backward. A part of ``CupyBackend`` (backend.py), which
    provides ``xp``, ``dtype``, ``col_budget_bytes``, ``_launch``, ``_c`` and ``_ones_vec``."""

    IM2COL = CudaKernel("im2col_nhwc", r"""
// col (N*H*W, k*k*C): col[(n,h,w), (i*k+j)*C + c] = x[n, h+i-p, w+j-p, c], zero outside.
extern "C" __global__ void im2col_nhwc(const real* __restrict__ x, real* __restrict__ col,
                                       int N, int H, int W, int C, int k, int p) {
    const int K = k * k * C;
    const long long total = (long long)N * H * W * K;
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, H, W, K);  // col viewed as (N, H, W, k*k*C)
        const int t = e.c / C, c = e.c % C;           // tap t = i*k + j, channel c
        const int hi = e.h + t / k - p;
        const int wi = e.w + t % k - p;
        real v = (real)0;
        if (hi >= 0 && hi < H && wi >= 0 && wi < W) v = x[nhwc_flat(e.n, hi, wi, c, H, W, C)];
        col[idx] = v;
    }
}
""")

    def _samples_per_chunk(self, N: int, H: int, W: int, K: int) -> int:
        per_sample = H * W * K * self.dtype.itemsize
        return int(max(1, min(N, self.col_budget_bytes // max(per_sample, 1))))

    def _im2col(self, x, n0, n1, k, out):
        """x (N,H,W,C) samples n0..n1 -> out ((n1-n0)*H*W, k*k*C)."""
        _, H, W, C = x.shape
        xs = x[n0:n1]  # contiguous: a slice of whole samples
        i32 = np.int32
        self._launch(self.IM2COL, out.size, xs, out, i32(n1 - n0), i32(H), i32(W), i32(C), i32(k), i32(k // 2))
        return out

    BIAS_ACT = CudaKernel("bias_act", r"""
// y (M, C) in place: y += b[c]; then max(y, 0) when relu != 0 (a NaN stays NaN).
extern "C" __global__ void bias_act(real* __restrict__ y, const real* __restrict__ b,
                                    long long total, int C, int relu) {
    GRID_LOOP(idx, total) {
        real v = y[idx] + b[idx % C];
        if (relu) v = relu_keep_nan(v);
        y[idx] = v;
    }
}
""")

    def conv2d_forward(self, x, w, b, relu=False):
        """y[n,h,w,o] = b[o] + sum_{i,j,c} w[o,c,i,j] * xpad[n,h+i,w+j,c], then max(y,0) if relu.

        x (N,H,W,Cin), w (Cout,Cin,k,k) with k odd, zero padding k//2, stride 1 -> y (N,H,W,Cout).
        As a GEMM: Y (N*H*W, Cout) = COL (N*H*W, k*k*Cin) @ Wm^T, Wm[o,(i*k+j)*Cin+c] = w[o,c,i,j].
        A 1x1 conv needs no im2col: COL is x itself.
        """
        xp = self.xp
        x, w, b = self._c(x), self._c(w), self._c(b)
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        K = k * k * Cin
        wmt = xp.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(K, Cout))  # (K,Cout) = Wm^T
        y = xp.empty((N, H, W, Cout), dtype=self.dtype)
        y2 = y.reshape(N * H * W, Cout)
        if k == 1:
            xp.matmul(x.reshape(N * H * W, Cin), wmt, out=y2)
        else:
            S = self._samples_per_chunk(N, H, W, K)
            col = xp.empty((S * H * W, K), dtype=self.dtype)
            for n0 in range(0, N, S):
                n1 = min(N, n0 + S)
                rows = (n1 - n0) * H * W
                self._im2col(x, n0, n1, k, col[:rows])
                xp.matmul(col[:rows], wmt, out=y2[n0 * H * W : n1 * H * W])
        self._launch(self.BIAS_ACT, y.size, y, b, np.int64(y.size), np.int32(Cout), np.int32(1 if relu else 0))
        return y, ConvCache(x, w, y if relu else None)

    COL2IM = CudaKernel("col2im_nhwc", r"""
// The adjoint of im2col, as a gather: dx[n,h,w,c] = sum_{i,j} dcol[(n, h-i+p, w-j+p), (i*k+j)*C + c]
// over the taps whose source pixel lies inside the image. Fixed (i, j) order: deterministic.
extern "C" __global__ void col2im_nhwc(const real* __restrict__ dcol, real* __restrict__ dx,
                                       int N, int H, int W, int C, int k, int p) {
    const int K = k * k * C;
    const long long total = (long long)N * H * W * C;
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, H, W, C);
        real s = (real)0;
        for (int i = 0; i < k; ++i) {
            const int ho = e.h - i + p;
            if (ho < 0 || ho >= H) continue;
            for (int j = 0; j < k; ++j) {
                const int wo = e.w - j + p;
                if (wo < 0 || wo >= W) continue;
                s += dcol[nhwc_flat(e.n, ho, wo, (i * k + j) * C + e.c, H, W, K)];  // dcol as (N,H,W,k*k*C)
            }
        }
        dx[idx] = s;
    }
}
""")

    def conv2d_backward(self, dy, cache, need_dx=True):
        """Gradients of conv2d_forward, dy (N,H,W,Cout) -> (dx (N,H,W,Cin) or None, dw, db).

        With ReLU fused, first dz = dy * [y > 0]. Then, with M = N*H*W rows:
            db (Cout)     = 1 (M) @ dZ (M,Cout)                 = sum_{n,h,w} dz[n,h,w,o]
            dWm (Cout,K)  = dZ^T @ COL                          -> dw[o,c,i,j] = dWm[o,(i*k+j)*Cin+c]
            dCOL (M,K)    = dZ @ Wm, then dx = col2im(dCOL)      (a gather over the k*k taps)
        COL is rebuilt chunk by chunk (not kept from the forward), and dWm is summed
        over the chunks in order.
        """
        xp = self.xp
        x, w, y = cache
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        K = k * k * Cin
        M = N * H * W
        dy = self._c(dy)
        if y is not None:
            dz = xp.empty_like(dy)
            # y may be the skip's view in an up-conv's [skip | up] (skip_part): the kernel reads it flat
            self._launch(ElementwiseOps.RELU_BWD, dz.size, dy, self._c(y), dz, np.int64(dz.size))
        else:
            dz = dy
        dz2 = dz.reshape(M, Cout)
        db = xp.matmul(self._ones_vec(M), dz2)  # (Cout,)
        wm = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cout, K))  # (Cout,K)
        dx = xp.empty((N, H, W, Cin), dtype=self.dtype) if need_dx else None
        if k == 1:
            x2 = x.reshape(M, Cin)
            dwm = xp.matmul(dz2.T, x2)
            if need_dx:
                xp.matmul(dz2, wm, out=dx.reshape(M, Cin))
        else:
            S = self._samples_per_chunk(N, H, W, K)
            col = xp.empty((S * H * W, K), dtype=self.dtype)
            dwm = None
            i32 = np.int32
            for n0 in range(0, N, S):
                n1 = min(N, n0 + S)
                rows = (n1 - n0) * H * W
                r0, r1 = n0 * H * W, n1 * H * W
                colc = self._im2col(x, n0, n1, k, col[:rows])
                part = xp.matmul(dz2[r0:r1].T, colc)  # (Cout,K)
                dwm = part if dwm is None else dwm + part
                if need_dx:
                    xp.matmul(dz2[r0:r1], wm, out=colc)  # dCOL reuses the COL buffer
                    self._launch(
                        self.COL2IM, rows * Cin, colc, dx[n0:n1],
                        i32(n1 - n0), i32(H), i32(W), i32(Cin), i32(k), i32(k // 2),
                    )
        dw = xp.ascontiguousarray(dwm.reshape(Cout, k, k, Cin).transpose(0, 3, 1, 2))
        return dx, dw, db
