"""The Numba CPU backend: parallel Numba kernels, with BLAS for the convolutions.

Same ops and semantics as the NumPy reference (``numpy_ref.py``, the spec);
float32 or float64. Activations are held channels-last, NHWC, between
``from_nchw`` and ``to_nchw``: every op below takes and returns NHWC arrays
(the shapes in the docstrings are the logical NCHW ones, the comments give the
memory layout). Parameters stay in PyTorch layouts; each op rearranges its
(small) weight into the matrix it multiplies by.

Strategy, chosen by measurement (see ``benchmarks/README.md``):
- conv k x k: im2col + GEMM in chunks of image rows, so the column buffer
  (k*k*Cin values per pixel) stays in cache and is reused, never a 300 MB
  array; the chunk GEMM is NumPy's BLAS; bias and ReLU are fused into one
  Numba pass over the chunk while it is still in cache. The input gradient is
  the same convolution of dz with the flipped, transposed kernel, the weight
  gradient the sum over chunks of col^T @ dz.
- 1x1 conv and 2x2 up-conv: one GEMM over all pixels plus a Numba
  scatter/gather of the 2x2 blocks.
- everything else: one parallel Numba loop.

Determinism: no parallel loop writes to a location another iteration writes,
reductions are split into a fixed number of blocks (independent of the thread
count) whose partial sums are added in order, and BLAS is called with the
same shapes every run. The same inputs give the same bytes run after run.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from minunet.kernels.base import check_dtype

_JIT = dict(cache=True, fastmath=False)
_PAR = dict(cache=True, fastmath=False, parallel=True)

# Rows of the im2col buffer per chunk: about 2-4 MB of columns at the U-Net's
# shapes, so a chunk's columns stay in L2/L3 between the copy and the GEMM.
_CHUNK_ELEMS = 1 << 20
_SUM_BLOCKS = 64  # fixed number of partial sums in reductions (deterministic)


class ConvCache(NamedTuple):
    x: np.ndarray  # (N,H,W,Cin) NHWC input
    w: np.ndarray  # (Cout,Cin,k,k) PyTorch layout
    y: np.ndarray | None  # (N,H,W,Cout) output after ReLU, when fused


class ReluCache(NamedTuple):
    y: np.ndarray  # the output; x > 0 exactly where y > 0


class PoolCache(NamedTuple):
    argmax: np.ndarray  # (N,H/2,W/2,C) uint8 in 0..3, row-major index in the window
    shape: tuple  # (N,H,W,C) of the input (NHWC)


class UpConvCache(NamedTuple):
    x: np.ndarray  # (N,H,W,Cin) NHWC
    w: np.ndarray  # (Cin,Cout,2,2) PyTorch layout


# ---------------------------------------------------------------------------
# Kernels. Arrays are C-contiguous NHWC unless said otherwise; "P" is N*H*W.
# ---------------------------------------------------------------------------


@njit(**_PAR)
def _im2col_rows(x, r0, nrows, k, col):
    """col[(rr*W + w), (i*k + j)*C + c] = xpad[n, h+i-p, w+j-p, c] for image row r0+rr = n*H + h.

    x (N,H,W,C); col (nrows*W, k*k*C); zero padding p = k//2. For a fixed
    (pixel, i) the k taps j are k*C contiguous values of x's row h+i-p."""
    N, H, W, C = x.shape
    p = k // 2
    kc = k * C
    xf = x.reshape(N * H * W * C)
    for rr in prange(nrows):
        r = r0 + rr
        n = r // H
        h = r - n * H
        for i in range(k):
            hs = h + i - p
            for w in range(W):
                row = rr * W + w
                base = i * kc
                if hs < 0 or hs >= H:
                    for t in range(kc):
                        col[row, base + t] = 0
                    continue
                # source pixels w-p .. w+p of row hs; those outside [0, W) are padding.
                wlo = w - p
                src = ((n * H + hs) * W + wlo) * C
                jlo = 0 if wlo >= 0 else -wlo
                jhi = k if w + p < W else k - (w + p - W + 1)
                for t in range(jlo * C):
                    col[row, base + t] = 0
                for t in range(jlo * C, jhi * C):
                    col[row, base + t] = xf[src + t]
                for t in range(jhi * C, kc):
                    col[row, base + t] = 0


@njit(**_PAR)
def _bias_act(y, b, relu):
    """In place on y (M, Cout): y += b, then max(y, 0) when relu."""
    M, C = y.shape
    for m in prange(M):
        for o in range(C):
            v = y[m, o] + b[o]
            if relu and v < 0:
                y[m, o] = 0
            else:
                y[m, o] = v


@njit(**_PAR)
def _relu_mask_colsum(dy, y, dz, nblocks):
    """dz = dy * [y > 0]; returns db = sum_m dz[m, :].   dy, y, dz (M, C).

    The column sums are taken in float64 over ``nblocks`` fixed blocks of
    rows, then added in block order: deterministic for any thread count."""
    M, C = dy.shape
    part = np.zeros((nblocks, C), np.float64)
    step = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        lo = blk * step
        hi = min(M, lo + step)
        for m in range(lo, hi):
            for o in range(C):
                if y[m, o] > 0:
                    v = dy[m, o]
                    dz[m, o] = v
                    part[blk, o] += v
                else:
                    dz[m, o] = 0
    out = np.zeros(C, np.float64)
    for blk in range(nblocks):
        for o in range(C):
            out[o] += part[blk, o]
    return out


@njit(**_PAR)
def _colsum(a, nblocks):
    """sum_m a[m, :] for a (M, C), in float64 over fixed blocks added in order (deterministic)."""
    M, C = a.shape
    part = np.zeros((nblocks, C), np.float64)
    step = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        lo = blk * step
        hi = min(M, lo + step)
        for m in range(lo, hi):
            for o in range(C):
                part[blk, o] += a[m, o]
    out = np.zeros(C, np.float64)
    for blk in range(nblocks):
        for o in range(C):
            out[o] += part[blk, o]
    return out


@njit(**_PAR)
def _relu_fwd(x, y):
    """y = max(x, 0), flat arrays."""
    for i in prange(x.size):
        v = x[i]
        if v < 0:
            y[i] = 0
        else:
            y[i] = v


@njit(**_PAR)
def _relu_bwd(dy, y, dx):
    """dx = dy * [y > 0], flat arrays."""
    for i in prange(dy.size):
        if y[i] > 0:
            dx[i] = dy[i]
        else:
            dx[i] = 0


@njit(**_PAR)
def _maxpool_fwd(x, y, am):
    """x (N,H,W,C) -> y (N,H/2,W/2,C), am uint8 window index of the first maximum.

    Window order: 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1). A NaN wins as in np.argmax."""
    N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    for r in prange(N * Ho):
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


@njit(**_PAR)
def _maxpool_bwd(dy, am, dx):
    """dx (N,H,W,C): each input pixel gathers dy of its window if it is the window's argmax, else 0."""
    N, H, W, C = dx.shape
    for r in prange(N * H):
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


@njit(**_PAR)
def _upconv_scatter(z, b, y):
    """y[n, 2h+i, 2w+j, o] = z[(n,h,w), (i*2+j)*Cout + o] + b[o].  z (N*H*W, 4*Cout), y (N,2H,2W,Cout)."""
    N, H2, W2, Co = y.shape
    H, W = H2 // 2, W2 // 2
    for r in prange(N * H2):
        n = r // H2
        yy = r - n * H2
        h = yy // 2
        i = yy - 2 * h
        for xx in range(W2):
            w = xx // 2
            j = xx - 2 * w
            zr = (n * H + h) * W + w
            zc = (i * 2 + j) * Co
            for o in range(Co):
                y[n, yy, xx, o] = z[zr, zc + o] + b[o]


@njit(**_PAR)
def _upconv_gather(dy, dz):
    """dz[(n,h,w), (i*2+j)*Cout + o] = dy[n, 2h+i, 2w+j, o]: the adjoint of the scatter."""
    N, H2, W2, Co = dy.shape
    H, W = H2 // 2, W2 // 2
    for r in prange(N * H):
        n = r // H
        h = r - n * H
        for w in range(W):
            zr = (n * H + h) * W + w
            for i in range(2):
                for j in range(2):
                    zc = (i * 2 + j) * Co
                    for o in range(Co):
                        dz[zr, zc + o] = dy[n, 2 * h + i, 2 * w + j, o]


@njit(**_PAR)
def _concat_last(a, b, out):
    """out[p, :Ca] = a[p], out[p, Ca:] = b[p]; a (P,Ca), b (P,Cb), out (P,Ca+Cb)."""
    P, Ca = a.shape
    Cb = b.shape[1]
    for p in prange(P):
        for c in range(Ca):
            out[p, c] = a[p, c]
        for c in range(Cb):
            out[p, Ca + c] = b[p, c]


@njit(**_PAR)
def _split_last(d, ca, a, b):
    """a[p] = d[p, :ca], b[p] = d[p, ca:]: the adjoint of the concat."""
    P, C = d.shape
    for p in prange(P):
        for c in range(ca):
            a[p, c] = d[p, c]
        for c in range(C - ca):
            b[p, c] = d[p, ca + c]


@njit(**_PAR)
def _sigmoid(z, s):
    """s = 1/(1+exp(-z)) for z >= 0, exp(z)/(1+exp(z)) otherwise; flat arrays."""
    for i in prange(z.size):
        v = z[i]
        e = np.exp(-abs(v))
        s[i] = 1 / (1 + e) if v >= 0 else e / (1 + e)


@njit(**_PAR)
def _sigmoid_bce(z, y, dz, nblocks):
    """Per pixel l = max(z,0) - z*y + log1p(exp(-|z|)) (in z's dtype), dz = (sigmoid(z) - y) / size.

    Returns sum(l) in float64, summed over fixed blocks in order (deterministic)."""
    n = z.size
    scale = z.dtype.type(n)
    part = np.zeros(nblocks, np.float64)
    step = (n + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        lo = blk * step
        hi = min(n, lo + step)
        acc = 0.0
        for i in range(lo, hi):
            v = z[i]
            t = y[i]
            e = np.exp(-abs(v))
            acc += (max(v, 0) - v * t) + np.log1p(e)
            s = 1 / (1 + e) if v >= 0 else e / (1 + e)
            dz[i] = (s - t) / scale
        part[blk] = acc
    total = 0.0
    for blk in range(nblocks):
        total += part[blk]
    return total


@njit(**_PAR)
def _adam(p, g, m, v, lr, b1, b2, eps, c1, c2, omb1, omb2):
    """The reference's Adam, operation for operation, in the arrays' dtype (all scalars already cast;
    omb1 = 1-b1 and omb2 = 1-b2 rounded once from float64, c1 = 1-b1^t, c2 = 1-b2^t)."""
    for i in prange(p.size):
        gi = g[i]
        mi = m[i] * b1 + omb1 * gi
        vi = v[i] * b2 + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


# ---------------------------------------------------------------------------


class NumbaBackend:
    """The fast CPU backend. Activations are NHWC (channels-last) between from_nchw and to_nchw."""

    name = "numba"
    xp = np

    def __init__(self, dtype="float32"):
        self.dtype = np.dtype(check_dtype(dtype))
        self._scratch = {}

    def _buffer(self, key, shape, dtype):
        """A scratch array reused across calls (never returned to the caller)."""
        buf = self._scratch.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
            self._scratch[key] = buf
        return buf

    # -- layout --------------------------------------------------------------
    def from_nchw(self, x):
        """(N,C,H,W) -> (N,H,W,C) contiguous, in the backend's dtype."""
        return np.ascontiguousarray(np.asarray(x, dtype=self.dtype).transpose(0, 2, 3, 1))

    def to_nchw(self, a):
        """(N,H,W,C) -> (N,C,H,W) contiguous (free when C == 1)."""
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype or self.dtype)

    def to_host(self, a):
        return np.asarray(a)

    # -- convolution ---------------------------------------------------------
    def _conv_gemm(self, x, wmat, k, b, relu, out2d):
        """out2d (P, Cout) = im2col(x) @ wmat (+ b, ReLU), chunk by chunk of image rows.

        x (N,H,W,Cin) NHWC; wmat (k*k*Cin, Cout) with rows ordered (i, j, c)."""
        N, H, W, Cin = x.shape
        K, Cout = wmat.shape
        rows = N * H
        if k == 1:
            np.dot(x.reshape(N * H * W, Cin), wmat, out=out2d)
            if b is not None:
                _bias_act(out2d, b, relu)
            return
        per = max(1, min(rows, _CHUNK_ELEMS // (W * K)))
        col_full = self._buffer(("col", per * W, K), (per * W, K), x.dtype)
        for r0 in range(0, rows, per):
            nr = min(per, rows - r0)
            col = col_full[: nr * W]
            _im2col_rows(x, r0, nr, k, col)
            yc = out2d[r0 * W : (r0 + nr) * W]
            np.dot(col, wmat, out=yc)
            if b is not None:
                _bias_act(yc, b, relu)

    def _conv_dw(self, x, dz2d, k):
        """dwmat (k*k*Cin, Cout) = sum over chunks of im2col(x)^T @ dz, chunks added in order."""
        N, H, W, Cin = x.shape
        Cout = dz2d.shape[1]
        K = k * k * Cin
        if k == 1:
            return x.reshape(N * H * W, Cin).T @ dz2d
        rows = N * H
        per = max(1, min(rows, _CHUNK_ELEMS // (W * K)))
        col_full = self._buffer(("col", per * W, K), (per * W, K), x.dtype)
        dwmat = np.zeros((K, Cout), x.dtype)
        part = self._buffer(("dwpart", K, Cout), (K, Cout), x.dtype)
        for r0 in range(0, rows, per):
            nr = min(per, rows - r0)
            col = col_full[: nr * W]
            _im2col_rows(x, r0, nr, k, col)
            np.dot(col.T, dz2d[r0 * W : (r0 + nr) * W], out=part)
            dwmat += part
        return dwmat

    def conv2d_forward(self, x, w, b, relu=False):
        """y[n,h,w,o] = b[o] + sum_{i,j,c} xpad[n,h+i,w+j,c] * w[o,c,i,j], then max(y,0) if relu.

        x (N,H,W,Cin) NHWC, w (Cout,Cin,k,k), k odd, zero pad k//2 -> y (N,H,W,Cout).
        As a matrix product: Y (P,Cout) = col (P, k*k*Cin) @ Wmat, Wmat[(i,j,c), o] = w[o,c,i,j]."""
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        wmat = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * Cin, Cout), dtype=x.dtype)
        x = np.ascontiguousarray(x)
        y = np.empty((N, H, W, Cout), x.dtype)
        self._conv_gemm(x, wmat, k, np.ascontiguousarray(b, dtype=x.dtype), relu, y.reshape(N * H * W, Cout))
        return y, ConvCache(x, w, y if relu else None)

    def conv2d_backward(self, dy, cache, need_dx=True):
        """dz = dy * [y > 0] (fused ReLU) or dy;
            db[o]       = sum_{n,h,w} dz[n,h,w,o]
            dw[o,c,i,j] = sum_{n,h,w} dz[n,h,w,o] * xpad[n,h+i,w+j,c]   (col^T @ dz)
            dx          = conv(dz, w') with w'[c,o,i,j] = w[o,c,k-1-i,k-1-j]   (the adjoint, pad k//2).
        dy (N,H,W,Cout) -> (dx (N,H,W,Cin) or None, dw (Cout,Cin,k,k), db (Cout))."""
        x, w, y = cache
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        P = N * H * W
        dy2d = dy.reshape(P, Cout)
        if y is not None:
            dz2d = np.empty((P, Cout), dy.dtype)
            db = _relu_mask_colsum(np.ascontiguousarray(dy2d), y.reshape(P, Cout), dz2d, _SUM_BLOCKS)
        else:
            dz2d = np.ascontiguousarray(dy2d)
            db = _colsum(dz2d, _SUM_BLOCKS)
        dwmat = self._conv_dw(x, dz2d, k)
        dw = np.ascontiguousarray(dwmat.reshape(k, k, Cin, Cout).transpose(3, 2, 0, 1)).astype(w.dtype, copy=False)
        dx = None
        if need_dx:
            # flipped kernel: wflip[(i,j,o), c] = w[o, c, k-1-i, k-1-j]
            wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(k * k * Cout, Cin), x.dtype)
            dx = np.empty((N, H, W, Cin), x.dtype)
            self._conv_gemm(dz2d.reshape(N, H, W, Cout), wflip, k, None, False, dx.reshape(P, Cin))
        return dx, dw, db.astype(w.dtype)

    # -- ReLU ----------------------------------------------------------------
    def relu_forward(self, x):
        """y = max(x, 0)."""
        y = np.empty_like(x)
        _relu_fwd(x.reshape(-1), y.reshape(-1))
        return y, ReluCache(y)

    def relu_backward(self, dy, cache):
        """dx = dy * [y > 0] (0 at the kink)."""
        dx = np.empty_like(dy)
        _relu_bwd(np.ascontiguousarray(dy).reshape(-1), cache.y.reshape(-1), dx.reshape(-1))
        return dx

    # -- max-pool ------------------------------------------------------------
    def maxpool2x2_forward(self, x):
        """y = max of each 2x2 window; argmax = first maximum in row-major window order (ties -> lowest).

        x (N,H,W,C) NHWC -> y (N,H/2,W/2,C), cache.argmax (N,H/2,W/2,C) uint8."""
        N, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
        y = np.empty((N, H // 2, W // 2, C), x.dtype)
        am = np.empty((N, H // 2, W // 2, C), np.uint8)
        _maxpool_fwd(x, y, am)
        return y, PoolCache(am, x.shape)

    def maxpool2x2_backward(self, dy, cache):
        """dx[n,2h+i,2w+j,c] = dy[n,h,w,c] if argmax[n,h,w,c] == 2i+j else 0."""
        dx = np.empty(cache.shape, dy.dtype)
        _maxpool_bwd(np.ascontiguousarray(dy), cache.argmax, dx)
        return dx

    # -- up-conv ---------------------------------------------------------------
    def upconv2x2_forward(self, x, w, b):
        """y[n,2h+i,2w+j,o] = b[o] + sum_c x[n,h,w,c] * w[c,o,i,j].

        x (N,H,W,Cin) NHWC, w (Cin,Cout,2,2) -> y (N,2H,2W,Cout). One GEMM
        Z (P, 4*Cout) = X (P,Cin) @ Wm, Wm[c, (i,j,o)] = w[c,o,i,j], then a scatter."""
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        wm = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout), dtype=x.dtype)
        z = self._buffer(("upz", N * H * W, 4 * Cout), (N * H * W, 4 * Cout), x.dtype)
        np.dot(x.reshape(N * H * W, Cin), wm, out=z)
        y = np.empty((N, 2 * H, 2 * W, Cout), x.dtype)
        _upconv_scatter(z, np.ascontiguousarray(b, dtype=x.dtype), y)
        return y, UpConvCache(x, w)

    def upconv2x2_backward(self, dy, cache):
        """dZ[(n,h,w),(i,j,o)] = dy[n,2h+i,2w+j,o];  dx = dZ @ Wm^T;  dWm = X^T @ dZ;
        db[o] = sum_{n,y,x} dy[n,y,x,o]. dy (N,2H,2W,Cout) -> (dx (N,H,W,Cin), dw (Cin,Cout,2,2), db)."""
        x, w = cache
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        P = N * H * W
        wm = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout), dtype=x.dtype)
        dy = np.ascontiguousarray(dy)
        dz = self._buffer(("updz", P, 4 * Cout), (P, 4 * Cout), x.dtype)
        _upconv_gather(dy, dz)
        dx = np.empty((N, H, W, Cin), x.dtype)
        np.dot(dz, wm.T, out=dx.reshape(P, Cin))
        dwm = x.reshape(P, Cin).T @ dz  # (Cin, 4*Cout) ordered (c, (i,j,o))
        dw = np.ascontiguousarray(dwm.reshape(Cin, 2, 2, Cout).transpose(0, 3, 1, 2)).astype(w.dtype, copy=False)
        db = _colsum(dy.reshape(4 * P, Cout), _SUM_BLOCKS)
        return dx, dw, db.astype(w.dtype)

    # -- skip connection -------------------------------------------------------
    def concat_channels(self, a, b):
        """(N,H,W,Ca), (N,H,W,Cb) -> (N,H,W,Ca+Cb), a's channels first."""
        N, H, W, Ca = a.shape
        Cb = b.shape[3]
        out = np.empty((N, H, W, Ca + Cb), a.dtype)
        _concat_last(a.reshape(N * H * W, Ca), b.reshape(N * H * W, Cb), out.reshape(N * H * W, Ca + Cb))
        return out

    def split_channels(self, d, ca):
        """(N,H,W,Ca+Cb) -> ((N,H,W,Ca), (N,H,W,Cb)), fresh arrays: the adjoint of concat."""
        N, H, W, C = d.shape
        a = np.empty((N, H, W, ca), d.dtype)
        b = np.empty((N, H, W, C - ca), d.dtype)
        _split_last(np.ascontiguousarray(d).reshape(N * H * W, C), ca, a.reshape(N * H * W, ca),
                    b.reshape(N * H * W, C - ca))
        return a, b

    # -- output and loss -----------------------------------------------------
    def sigmoid(self, z):
        """1 / (1 + exp(-z)), written so exp only sees -|z| (NCHW in and out)."""
        z = np.ascontiguousarray(z)
        s = np.empty_like(z)
        _sigmoid(z.reshape(-1), s.reshape(-1))
        return s

    def sigmoid_bce(self, z, y):
        """loss = mean(max(z,0) - z*y + log1p(exp(-|z|))); dz = (sigmoid(z) - y) / z.size. NCHW."""
        z = np.ascontiguousarray(z)
        y = np.ascontiguousarray(y, dtype=z.dtype)
        dz = np.empty_like(z)
        total = _sigmoid_bce(z.reshape(-1), y.reshape(-1), dz.reshape(-1), _SUM_BLOCKS)
        return float(total / z.size), dz

    # -- optimizer -----------------------------------------------------------
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), in place, in p's dtype."""
        T = p.dtype.type
        _adam(p.reshape(-1), np.ascontiguousarray(g, dtype=p.dtype).reshape(-1), m.reshape(-1), v.reshape(-1),
              T(lr), T(beta1), T(beta2), T(eps), T(1 - beta1**t), T(1 - beta2**t), T(1 - beta1), T(1 - beta2))
