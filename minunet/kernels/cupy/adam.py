"""The fused Adam step, in place on contiguous device arrays."""

from __future__ import annotations

import numpy as np

from minunet.kernels.cupy.cuda import CudaKernel


class AdamOps:
    """adam_step. A part of ``CupyBackend`` (backend.py), which provides ``dtype``, ``_launch`` and ``_c``."""

    ADAM = CudaKernel("adam_k", r"""
// Adam, in place:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//                  p -= lr * (m / bc1) / (sqrt(v / bc2) + eps),  bc1 = 1-b1^t, bc2 = 1-b2^t.
extern "C" __global__ void adam_k(real* __restrict__ p, const real* __restrict__ g,
                                  real* __restrict__ m, real* __restrict__ v, long long total,
                                  real lr, real b1, real omb1, real b2, real omb2,
                                  real eps, real bc1, real bc2) {
    GRID_LOOP(idx, total) {
        const real gi = g[idx];
        const real mi = b1 * m[idx] + omb1 * gi;
        const real vi = b2 * v[idx] + omb2 * gi * gi;
        m[idx] = mi;
        v[idx] = vi;
        p[idx] -= lr * (mi / bc1) / (SQRT(vi / bc2) + eps);
    }
}
""")

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).  In place on p, m, v (contiguous)."""
        for name, a in (("p", p), ("m", m), ("v", v)):
            if not a.flags.c_contiguous or a.dtype != self.dtype:
                raise ValueError(f"adam_step needs {name} as a contiguous {self.dtype.name} array")
        g = self._c(g)
        r = self.dtype.type  # the kernel's `real`
        self._launch(
            self.ADAM, p.size, p, g, m, v, np.int64(p.size),
            r(lr), r(beta1), r(1 - beta1), r(beta2), r(1 - beta2),
            r(eps), r(1 - beta1**t), r(1 - beta2**t),
        )
