"""Adam, in place on a parameter and its two moments, one flat kernel over chunks."""

from __future__ import annotations

import numpy as np
from numba import njit

from minunet.kernels.numba import threads
from minunet.kernels.numba.threads import JIT


@njit(**JIT)
def _adam(p, g, m, v, lr, b1, b2, eps, c1, c2, omb1, omb2):
    """The reference's Adam, operation for operation, in the arrays' dtype (all scalars already cast;
    omb1 = 1-b1 and omb2 = 1-b2 rounded once from float64, c1 = 1-b1^t, c2 = 1-b2^t). Flat arrays."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1 + omb1 * gi
        vi = v[i] * b2 + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


def adam_step(p, g, m, v, lr, beta1, beta2, eps, t):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), in place, in p's dtype.

    p, g, m, v of one shape. The kernel walks flat arrays; a strided p, m or v
    (a view such as w[:3, :3]) has no flat view, so it is updated in a
    contiguous copy that is written back."""
    for name, a in (("g", g), ("m", m), ("v", v)):
        if np.shape(a) != p.shape:
            raise ValueError(f"adam_step: {name} has shape {np.shape(a)}, the parameter {p.shape}: they must match")
    T = p.dtype.type
    pc, mc, vc = np.ascontiguousarray(p), np.ascontiguousarray(m), np.ascontiguousarray(v)
    pf, mf, vf = pc.reshape(-1), mc.reshape(-1), vc.reshape(-1)
    gf = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
    args = (T(lr), T(beta1), T(beta2), T(eps), T(1 - beta1**t), T(1 - beta2**t), T(1 - beta1), T(1 - beta2))
    threads.run(lambda lo, hi: _adam(pf[lo:hi], gf[lo:hi], mf[lo:hi], vf[lo:hi], *args), threads.flat_ranges(pf.size))
    for a, c in ((p, pc), (m, mc), (v, vc)):
        if c is not a:
            a[...] = c
