"""The elementwise ops of the numba backend: ReLU, sigmoid and the fused sigmoid + BCE loss.
Each runs a flat kernel over chunks.

NaN and inf propagate (the rule in ``kernels/base.py``): ReLU keeps a NaN
(NaN < 0 is false), its backward multiplies by the mask (a NaN in dy stays NaN),
sigmoid of NaN is NaN, and a NaN logit makes the loss NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from minunet.kernels.base import check_same_shape
from minunet.kernels.numba import threads
from minunet.kernels.numba.threads import JIT


class ReluCache(NamedTuple):
    y: np.ndarray  # the output; x > 0 exactly where y > 0


# -- ReLU ----------------------------------------------------------------------------


@njit(**JIT)
def _relu_fwd(x, y):
    """y = max(x, 0), flat arrays; a NaN stays NaN."""
    for i in range(x.size):
        v = x[i]
        if v < 0:
            y[i] = 0
        else:
            y[i] = v


def relu_forward(x):
    """y = max(x, 0)."""
    xf = np.ascontiguousarray(x).reshape(-1)
    y = np.empty(x.shape, x.dtype)
    yf = y.reshape(-1)
    threads.run(lambda lo, hi: _relu_fwd(xf[lo:hi], yf[lo:hi]), threads.flat_ranges(xf.size))
    return y, ReluCache(y)


@njit(**JIT)
def _relu_bwd(dy, y, dx):
    """dx = dy * [y > 0], flat arrays: a product, not a select, so a NaN or inf in dy gives NaN where y <= 0."""
    one, zero = np.ones(1, dx.dtype)[0], np.zeros(1, dx.dtype)[0]
    for i in range(dy.size):
        dx[i] = dy[i] * (one if y[i] > 0 else zero)


def relu_backward(dy, cache):
    """dx = dy * [y > 0] (0 at the kink)."""
    dyf, yf = np.ascontiguousarray(dy).reshape(-1), cache.y.reshape(-1)
    dx = np.empty(cache.y.shape, dy.dtype)
    dxf = dx.reshape(-1)
    threads.run(lambda lo, hi: _relu_bwd(dyf[lo:hi], yf[lo:hi], dxf[lo:hi]), threads.flat_ranges(dyf.size))
    return dx


# -- output and loss ---------------------------------------------------------------------


@njit(**JIT)
def _sigmoid(z, s):
    """s = 1/(1+exp(-z)) for z >= 0, exp(z)/(1+exp(z)) otherwise (exp only sees -|z|); flat arrays."""
    for i in range(z.size):
        v = z[i]
        e = np.exp(-abs(v))
        s[i] = 1 / (1 + e) if v >= 0 else e / (1 + e)


def sigmoid(z):
    """1 / (1 + exp(-z)), written so exp only sees -|z| (NCHW in and out)."""
    z = np.ascontiguousarray(z)
    s = np.empty_like(z)
    zf, sf = z.reshape(-1), s.reshape(-1)
    threads.run(lambda lo, hi: _sigmoid(zf[lo:hi], sf[lo:hi]), threads.flat_ranges(zf.size))
    return s


@njit(**JIT)
def _sigmoid_bce(z, y, w, w_step, dz, size):
    """Per pixel l = max(z,0) - z*y + log1p(exp(-|z|)), dz = w * (sigmoid(z) - y) / size; returns sum(w * l)
    (float64). The weight of pixel i is w[i * w_step]: w_step 0 reads one weight for all (unweighted: w = [1],
    and a product by 1 is exact, so the unweighted figures are bit for bit those of a kernel without w)."""
    acc = 0.0
    for i in range(z.size):
        v = z[i]
        t = y[i]
        wi = w[i * w_step]
        e = np.exp(-abs(v))
        acc += wi * ((max(v, 0) - v * t) + np.log1p(e))
        s = 1 / (1 + e) if v >= 0 else e / (1 + e)
        dz[i] = wi * (s - t) / size
    return acc


def sigmoid_bce(z, y, w=None):
    """loss = sum(w * l) / z.size, l = max(z,0) - z*y + log1p(exp(-|z|)); dz = w * (sigmoid(z) - y) / z.size.
    NCHW; w None: every weight 1 (the mean BCE).

    z, y (and w) must have the same shape (the kernel reads them element for element).
    The per-chunk sums (float64) are added in chunk order: deterministic."""
    z = np.ascontiguousarray(z)
    check_same_shape(z, y, w)
    y = np.ascontiguousarray(y, dtype=z.dtype)
    weighted = w is not None
    w = np.ascontiguousarray(w, dtype=z.dtype).reshape(-1) if weighted else np.ones(1, z.dtype)
    dz = np.empty_like(z)
    zf, yf, dzf = z.reshape(-1), y.reshape(-1), dz.reshape(-1)
    size = z.dtype.type(z.size)
    chunks = threads.flat_ranges(zf.size)
    parts = threads.run(
        lambda lo, hi: _sigmoid_bce(zf[lo:hi], yf[lo:hi], w[lo:hi] if weighted else w, int(weighted), dzf[lo:hi],
                                    size), chunks)
    total = 0.0
    for s in parts:
        total += s
    return float(total / z.size), dz
