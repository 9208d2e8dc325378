"""2x2 max-pool, stride 2, on NHWC device arrays: forward records the argmax, backward gathers."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minunet.kernels.cupy.cuda import CudaKernel


class PoolCache(NamedTuple):
    argmax: Any  # (N,H/2,W/2,C) uint8 in 0..3: row-major index in the 2x2 window
    shape: tuple  # (N,H,W,C) of the input


class PoolOps:
    """maxpool2x2_forward / maxpool2x2_backward. A part of ``CupyBackend`` (backend.py),
    which provides ``xp``, ``dtype``, ``_launch`` and ``_c``."""

    MAXPOOL_FWD = CudaKernel("maxpool_fwd", r"""
// x (N,H,W,C) -> y (N,H/2,W/2,C), am (N,H/2,W/2,C) in 0..3 (row-major in the window:
// 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). A NaN wins: the first NaN, else the
// first maximum (strict >), as numpy.argmax.
extern "C" __global__ void maxpool_fwd(const real* __restrict__ x, real* __restrict__ y,
                                       unsigned char* __restrict__ am, int N, int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const long long total = (long long)N * Ho * Wo * C;
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, Ho, Wo, C);
        const real* p0 = x + nhwc_flat(e.n, 2 * e.h, 2 * e.w, e.c, H, W, C);  // top-left of the window
        const real v[4] = {p0[0], p0[C], p0[(long long)W * C], p0[(long long)W * C + C]};
        real best = v[0];
        unsigned char a = 0;
        for (unsigned char q = 1; q < 4 && !is_nan(best); ++q) {  // once best is NaN it stays
            if (v[q] > best || is_nan(v[q])) { best = v[q]; a = q; }
        }
        y[idx] = best;
        am[idx] = a;
    }
}
""")

    def maxpool2x2_forward(self, x):
        """x (N,H,W,C) -> y (N,H/2,W/2,C) = max of each 2x2 window; argmax 0..3 = the first NaN,
        else the first maximum in row-major window order (ties -> lowest index), as the reference."""
        x = self._c(x)
        N, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
        y = self.xp.empty((N, H // 2, W // 2, C), dtype=self.dtype)
        am = self.xp.empty((N, H // 2, W // 2, C), dtype=np.uint8)
        i32 = np.int32
        self._launch(self.MAXPOOL_FWD, y.size, x, y, am, i32(N), i32(H), i32(W), i32(C))
        return y, PoolCache(am, x.shape)

    MAXPOOL_BWD = CudaKernel("maxpool_bwd", r"""
// Gather per input pixel: dx[n,h,w,c] = dy[n,h/2,w/2,c] if this pixel is its window's argmax, else 0.
extern "C" __global__ void maxpool_bwd(const real* __restrict__ dy, const unsigned char* __restrict__ am,
                                       real* __restrict__ dx, int N, int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const long long total = (long long)N * H * W * C;
    GRID_LOOP(idx, total) {
        const Nhwc e = nhwc_unflatten(idx, H, W, C);
        const long long o = nhwc_flat(e.n, e.h >> 1, e.w >> 1, e.c, Ho, Wo, C);
        const unsigned char q = (unsigned char)(((e.h & 1) << 1) | (e.w & 1));
        dx[idx] = am[o] == q ? dy[o] : (real)0;
    }
}
""")

    def maxpool2x2_backward(self, dy, cache):
        """dy (N,H/2,W/2,C) -> dx (N,H,W,C): zero except at each window's argmax, which gets dy.
        Computed per input pixel (a gather), so there is no scatter and no atomics."""
        dy = self._c(dy)
        N, H, W, C = cache.shape
        dx = self.xp.empty((N, H, W, C), dtype=self.dtype)
        i32 = np.int32
        self._launch(self.MAXPOOL_BWD, dx.size, dy, cache.argmax, dx, i32(N), i32(H), i32(W), i32(C))
        return dx
