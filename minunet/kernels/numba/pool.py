"""2x2 max-pool, stride 2, on NHWC activations: the forward keeps each window's argmax (0..3),
the backward routes the gradient to it.

Window order: 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1). Ties go to the lowest index
and a NaN wins (the first NaN of the window), as ``np.argmax`` in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from minunet.kernels.numba import threads
from minunet.kernels.numba.threads import JIT


class PoolCache(NamedTuple):
    argmax: np.ndarray  # (N,H/2,W/2,C) uint8 in 0..3, row-major index in the window
    shape: tuple  # (N,H,W,C) of the input (NHWC)


@njit(**JIT)
def _maxpool_fwd(x, y, am, r0, r1):
    """x (N,H,W,C) -> y (N,H/2,W/2,C), am uint8 window index of the first maximum; output rows [r0, r1).

    A NaN wins: a window whose first value is NaN keeps it, and a later NaN takes over and stops the scan."""
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    for r in range(r0, r1):
        n = r // Ho
        ho = r - n * Ho
        for wo in range(Wo):
            for c in range(C):
                best = x[n, 2 * ho, 2 * wo, c]
                arg = 0
                if best == best:
                    for t in range(1, 4):
                        v = x[n, 2 * ho + t // 2, 2 * wo + t % 2, c]
                        if v > best or v != v:
                            best = v
                            arg = t
                            if v != v:
                                break
                y[n, ho, wo, c] = best
                am[n, ho, wo, c] = arg


def maxpool2x2_forward(x):
    """y = max of each 2x2 window; argmax = first maximum in row-major window order (ties -> lowest).

    x (N,H,W,C) NHWC -> y (N,H/2,W/2,C), cache.argmax (N,H/2,W/2,C) uint8."""
    x = np.ascontiguousarray(x)
    N, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
    y = np.empty((N, H // 2, W // 2, C), x.dtype)
    am = np.empty((N, H // 2, W // 2, C), np.uint8)
    chunks = threads.ranges(N * H // 2, threads.ELEMS // (2 * W * C))  # rows of the output
    threads.run(lambda r0, r1: _maxpool_fwd(x, y, am, r0, r1), chunks)
    return y, PoolCache(am, x.shape)


@njit(**JIT)
def _maxpool_bwd(dy, am, dx, r0, r1):
    """dx (N,H,W,C), input rows [r0, r1): each pixel takes dy of its window if it is the argmax, else 0."""
    N, H, W, C = dx.shape
    for r in range(r0, r1):
        n = r // H
        h = r - n * H
        ho = h // 2
        i = h - 2 * ho
        for w in range(W):
            wo = w // 2
            t = i * 2 + (w - 2 * wo)
            for c in range(C):
                if am[n, ho, wo, c] == t:
                    dx[n, h, w, c] = dy[n, ho, wo, c]
                else:
                    dx[n, h, w, c] = 0


def maxpool2x2_backward(dy, cache):
    """dx[n,2h+i,2w+j,c] = dy[n,h,w,c] if argmax[n,h,w,c] == 2i+j else 0."""
    N, H, W, C = cache.shape
    dy = np.ascontiguousarray(dy)
    dx = np.empty(cache.shape, dy.dtype)
    chunks = threads.ranges(N * H, threads.ELEMS // (W * C))  # rows of the input
    threads.run(lambda r0, r1: _maxpool_bwd(dy, cache.argmax, dx, r0, r1), chunks)
    return dx
