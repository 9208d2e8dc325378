"""The NumPy reference backend: plain, readable, float32 or float64.

This file is the spec. Every fast backend is tested against it, and it is
tested against central finite differences. Activations stay in NCHW.
Notation: N batch, C/Cin/Cout channels, H, W height and width, k kernel size.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minunet.kernels.base import Backend, check_dtype, check_same_shape


class ConvCache(NamedTuple):
    x: np.ndarray  # (N,Cin,H,W) the input
    w: np.ndarray  # (Cout,Cin,k,k)
    y: np.ndarray | None  # (N,Cout,H,W) the output after ReLU, when fused


class ReluCache(NamedTuple):
    y: np.ndarray  # the output; x > 0 exactly where y > 0


class PoolCache(NamedTuple):
    argmax: np.ndarray  # (N,C,H/2,W/2) uint8 in 0..3: row-major index in the window
    shape: tuple  # (N,C,H,W) of the input


class UpConvCache(NamedTuple):
    x: np.ndarray  # (N,Cin,H,W)
    w: np.ndarray  # (Cin,Cout,2,2)
    cs: int  # the skip's channels: the first cs channels of the output


def _stable_sigmoid(z):
    # exp of a non-positive number only: no overflow for any z.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self, dtype="float32"):
        self.dtype = np.dtype(check_dtype(dtype))

    # -- layout --------------------------------------------------------------
    def from_nchw(self, x):
        return np.ascontiguousarray(x, dtype=self.dtype)

    def to_nchw(self, a):
        return a

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype or self.dtype)

    def to_host(self, a):
        return np.asarray(a)

    # -- convolution ---------------------------------------------------------
    def conv2d_forward(self, x, w, b, relu=False):
        """y[n,o,h,w] = b[o] + sum_{c,i,j} w[o,c,i,j] * xpad[n,c,h+i,w+j].

        x (N,Cin,H,W), w (Cout,Cin,k,k) with k odd, zero padding k//2, stride 1.
        The sum over (i, j) is written as k*k matrix products, one per tap.
        """
        N, Cin, H, W = x.shape
        Cout, _, k, _ = w.shape
        p = k // 2
        xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))  # (N,Cin,H+2p,W+2p)
        y = np.zeros((N, Cout, H, W), dtype=x.dtype)
        for i in range(k):
            for j in range(k):
                tap = xpad[:, :, i : i + H, j : j + W]  # (N,Cin,H,W)
                y += np.einsum("oc,nchw->nohw", w[:, :, i, j], tap, optimize=True)
        y += b[None, :, None, None]
        if relu:
            np.maximum(y, 0, out=y)
        return y, ConvCache(x, w, y if relu else None)

    def conv2d_backward(self, dy, cache, need_dx=True):
        """Gradients of conv2d_forward.

        With ReLU fused, first dz = dy * [y > 0]. Then
            db[o]       = sum_{n,h,w} dz[n,o,h,w]
            dw[o,c,i,j] = sum_{n,h,w} dz[n,o,h,w] * xpad[n,c,h+i,w+j]
            dxpad[n,c,h+i,w+j] += sum_o dz[n,o,h,w] * w[o,c,i,j]   (then crop)
        """
        x, w, y = cache
        if y is not None:
            dy = dy * (y > 0)
        N, Cin, H, W = x.shape
        k = w.shape[2]
        p = k // 2
        xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        dw = np.empty_like(w)
        dxpad = np.zeros_like(xpad) if need_dx else None
        for i in range(k):
            for j in range(k):
                tap = xpad[:, :, i : i + H, j : j + W]
                dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, tap, optimize=True)
                if need_dx:
                    dxpad[:, :, i : i + H, j : j + W] += np.einsum(
                        "nohw,oc->nchw", dy, w[:, :, i, j], optimize=True
                    )
        db = dy.sum(axis=(0, 2, 3))
        dx = dxpad[:, :, p : p + H, p : p + W].copy() if need_dx else None
        return dx, dw, db

    # -- ReLU ----------------------------------------------------------------
    def relu_forward(self, x):
        y = np.maximum(x, 0)
        return y, ReluCache(y)

    def relu_backward(self, dy, cache):
        # d/dx max(x, 0) = 1 for x > 0, else 0 (we take 0 at the kink).
        return dy * (cache.y > 0)

    # -- max-pool ------------------------------------------------------------
    @staticmethod
    def _windows(x):
        """(N,C,H,W) -> (N,C,H/2,W/2,4): the four values of each 2x2 window,
        in row-major order (0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right)."""
        N, C, H, W = x.shape
        return x.reshape(N, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
            N, C, H // 2, W // 2, 4
        )

    def maxpool2x2_forward(self, x):
        """y = max of each 2x2 window; the argmax is the first maximum (ties -> lowest index),
        or the first NaN when there is one (NaN wins, as numpy.argmax)."""
        N, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
        win = self._windows(x)
        argmax = win.argmax(axis=-1).astype(np.uint8)
        y = np.take_along_axis(win, argmax[..., None].astype(np.intp), axis=-1)[..., 0]
        return y, PoolCache(argmax, x.shape)

    def maxpool2x2_backward(self, dy, cache):
        """dx is zero except at each window's argmax, which receives dy."""
        N, C, H, W = cache.shape
        dwin = np.zeros((N, C, H // 2, W // 2, 4), dtype=dy.dtype)
        np.put_along_axis(dwin, cache.argmax[..., None].astype(np.intp), dy[..., None], axis=-1)
        return dwin.reshape(N, C, H // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
            N, C, H, W
        )

    # -- up-conv with the skip connection ---------------------------------------
    def upconv2x2_forward(self, x, w, b, skip):
        """y = [skip | up(x)]: the decoder's up-conv, written after the skip in one buffer.

            y[n, c]                 = skip[n, c]                               c < Cs
            y[n, Cs+o, 2h+i, 2w+j]  = b[o] + sum_c x[n,c,h,w] * w[c,o,i,j]

        x (N,Cin,H,W), w (Cin,Cout,2,2), b (Cout), skip (N,Cs,2H,2W) -> y (N,Cs+Cout,2H,2W).
        Each input pixel paints its own 2x2 output block: the windows do not
        overlap, so the up-conv is one matrix product and a reshape."""
        N, Cin, H, W = x.shape
        Cs, Cout = skip.shape[1], w.shape[1]
        y = np.empty((N, Cs + Cout, 2 * H, 2 * W), dtype=x.dtype)
        y[:, :Cs] = skip
        up = y[:, Cs:]
        up[...] = np.einsum("nchw,coij->nohiwj", x, w, optimize=True).reshape(N, Cout, 2 * H, 2 * W)
        up += b[None, :, None, None]
        return y, UpConvCache(x, w, Cs)

    def skip_part(self, y, skip):
        """y[:, :Cs] of [skip | up]: a view of the skip's channels (NCHW)."""
        return y[:, : skip.shape[1]]

    def upconv2x2_backward(self, dy, cache):
        """dy (N,Cs+Cout,2H,2W) -> (dx (N,Cin,H,W), dw (Cin,Cout,2,2), db (Cout), dskip (N,Cs,2H,2W)).

        The concatenation's adjoint splits dy: dskip = dy[:, :Cs] (a view), and the
        up-conv's gradients read du = dy[:, Cs:]:
            dx[n,c,h,w] = sum_{o,i,j} du[n,o,2h+i,2w+j] * w[c,o,i,j]
            dw[c,o,i,j] = sum_{n,h,w} x[n,c,h,w] * du[n,o,2h+i,2w+j]
            db[o]       = sum_{n,y,x} du[n,o,y,x]"""
        x, w, Cs = cache
        N, Cin, H, W = x.shape
        Cout = w.shape[1]
        du = np.ascontiguousarray(dy[:, Cs:])
        d6 = du.reshape(N, Cout, H, 2, W, 2)  # (n,o,h,i,w,j)
        dx = np.einsum("nohiwj,coij->nchw", d6, w, optimize=True)
        dw = np.einsum("nchw,nohiwj->coij", x, d6, optimize=True)
        db = du.sum(axis=(0, 2, 3))
        return dx, dw, db, dy[:, :Cs]

    # -- output and loss -----------------------------------------------------
    def sigmoid(self, z):
        return _stable_sigmoid(z)

    def sigmoid_bce(self, z, y, w=None):
        """loss = sum(w * l) / z.size with l = max(z,0) - z*y + log1p(exp(-|z|)); dz = w * (sigmoid(z) - y) / z.size
        (w None: every weight 1, the mean BCE).

        The form avoids exp of a positive number, so it is finite for any z
        (log(sigmoid(z)) would overflow at z = -1e4)."""
        check_same_shape(z, y, w)
        y = y.astype(z.dtype, copy=False)
        per_pixel = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
        diff = _stable_sigmoid(z) - y
        if w is not None:
            w = w.astype(z.dtype, copy=False)
            per_pixel, diff = w * per_pixel, w * diff
        loss = float(per_pixel.mean(dtype=np.float64))
        dz = diff / z.size
        return loss, dz.astype(z.dtype, copy=False)

    # -- optimizer -----------------------------------------------------------
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(p.dtype, copy=False)
