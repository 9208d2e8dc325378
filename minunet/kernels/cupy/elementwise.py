"""Elementwise ops on device arrays of any layout: ReLU, sigmoid, fused BCE.

Channels are the fastest-varying NHWC axis, so neighbouring threads touch
neighbouring addresses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minunet.kernels.base import check_same_shape
from minunet.kernels.cupy.cuda import CudaKernel


class ReluCache(NamedTuple):
    y: Any  # the output; x > 0 exactly where y > 0


class ElementwiseOps:
    """ReLU, sigmoid and the fused loss. A part of ``CupyBackend`` (backend.py),
    which provides ``xp``, ``dtype``, ``_launch`` and ``_c``."""

    RELU_FWD = CudaKernel("relu_fwd", r"""
// y = max(x, 0), a NaN stays NaN
extern "C" __global__ void relu_fwd(const real* __restrict__ x, real* __restrict__ y, long long total) {
    GRID_LOOP(idx, total) {
        y[idx] = relu_keep_nan(x[idx]);
    }
}
""")

    def relu_forward(self, x):
        """y = max(x, 0) -> (y, cache)."""
        x = self._c(x)
        y = self.xp.empty_like(x)
        self._launch(self.RELU_FWD, x.size, x, y, np.int64(x.size))
        return y, ReluCache(y)

    RELU_BWD = CudaKernel("relu_bwd", r"""
// dx = dy * [y > 0]   (y is the ReLU output; y > 0 exactly where its input > 0). A product, as in
// the reference, not a select: a NaN or inf in dy gives NaN even where y <= 0.
extern "C" __global__ void relu_bwd(const real* __restrict__ dy, const real* __restrict__ y,
                                    real* __restrict__ dx, long long total) {
    GRID_LOOP(idx, total) {
        dx[idx] = dy[idx] * (y[idx] > (real)0 ? (real)1 : (real)0);
    }
}
""")

    def relu_backward(self, dy, cache):
        """dx = dy * [y > 0] (0 at the kink)."""
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self._launch(self.RELU_BWD, dx.size, dy, cache.y, dx, np.int64(dx.size))
        return dx

    SIGMOID = CudaKernel("sigmoid_k", r"""
// Stable sigmoid: exp of a non-positive number only.
extern "C" __global__ void sigmoid_k(const real* __restrict__ z, real* __restrict__ s, long long total) {
    GRID_LOOP(idx, total) {
        const real v = z[idx];
        const real e = EXP(-FABS(v));
        s[idx] = v >= (real)0 ? (real)1 / ((real)1 + e) : e / ((real)1 + e);
    }
}
""")

    def sigmoid(self, z):
        """Elementwise 1 / (1 + exp(-z)), stable for any z (any layout in, same out)."""
        z = self._c(z)
        s = self.xp.empty_like(z)
        self._launch(self.SIGMOID, z.size, z, s, np.int64(z.size))
        return s

    SIGMOID_BCE = CudaKernel("sigmoid_bce_k", r"""
// Fused sigmoid + BCE with logits, each pixel weighted, per element:
//   wi = w[idx * w_step]      (w_step 0: one weight for all, the unweighted loss with w = {1})
//   lp = wi * (max(z,0) - z*y + log1p(exp(-|z|)))      dz = wi * (sigmoid(z) - y) / n
extern "C" __global__ void sigmoid_bce_k(const real* __restrict__ z, const real* __restrict__ y,
                                         const real* __restrict__ w, long long w_step,
                                         real* __restrict__ lp, real* __restrict__ dz,
                                         long long total, real n) {
    GRID_LOOP(idx, total) {
        const real v = z[idx], t = y[idx], wi = w[idx * w_step];
        const real e = EXP(-FABS(v));
        lp[idx] = wi * ((v > (real)0 ? v : (real)0) - v * t + LOG1P(e));
        const real s = v >= (real)0 ? (real)1 / ((real)1 + e) : e / ((real)1 + e);
        dz[idx] = wi * (s - t) / n;
    }
}
""")

    def sigmoid_bce_device(self, z, y, w=None):
        """As ``sigmoid_bce`` but the loss stays on the device as a 0-d float64 array.

        No host synchronisation: a training loop can keep it and call float() on it
        only when it logs. (A NaN z makes lp NaN through -z*y and log1p, so the
        max(z, 0) term needs no NaN care.)"""
        z = self._c(z)
        y = self._c(y)
        w = None if w is None else self._c(w)
        check_same_shape(z, y, w)
        lp = self.xp.empty_like(z)
        dz = self.xp.empty_like(z)
        w_arg, w_step = (self._ones_vec(1), 0) if w is None else (w, 1)
        self._launch(self.SIGMOID_BCE, z.size, z, y, w_arg, np.int64(w_step), lp, dz, np.int64(z.size),
                     self.dtype.type(z.size))
        loss = lp.sum(dtype=np.float64) / z.size
        return loss, dz

    def sigmoid_bce(self, z, y, w=None):
        """loss = sum(w * l) / z.size, l = max(z,0) - z*y + log1p(exp(-|z|)); dz = w * (sigmoid(z) - y) / z.size
        (w None: every weight 1).

        Returns (loss as a Python float, dz). The float() waits for the GPU; see
        ``sigmoid_bce_device`` for the variant that does not."""
        loss, dz = self.sigmoid_bce_device(z, y, w)
        return float(loss), dz
