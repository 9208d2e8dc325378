"""Convolution, k x k (k odd, zero padding k//2, stride 1), on NHWC activations.

Three ways to the same sums, chosen by shape (``use_direct``, ``use_shifted``):
- im2col + GEMM (most shapes): per chunk of image rows, the columns of the
  chunk go into a per-thread buffer of about 2 MB (it stays in cache), one
  GEMM writes the output rows, and bias and ReLU are fused in one pass over
  the rows still in cache. No full-size column buffer is built. The input
  gradient is the same convolution of dz with the flipped, transposed
  kernel; the weight gradient is a per-chunk col^T @ dz.
- direct kernels (the upper U-Net levels, where the GEMM is thin and im2col
  copies the input 9 times, and on AVX-512 machines most levels; the rule in
  ``use_direct`` and ``use_direct_dw``, chosen by measurement): a register
  block of 4 pixels x 16 outputs (8 on AVX-512) summed over taps and input
  channels (forward and input gradient), and of 4 (or 1; 16 or 8 on AVX-512)
  input x 16 output channels summed over a chunk's pixels (weight gradient).
  Measured at 8x256x256: 16->16 forward 38 -> 15 ms, backward 94 -> 33 ms.
  Their source is generated (``conv_direct_gen.py``) and checked in
  (``conv_direct_kernels.py``).
- shifted GEMMs (``conv_shifted.py``; images up to 64 pixels wide, where
  im2col's 2 MB chunks are one or a few image rows and each GEMM thin): k*k
  GEMMs with all the pixels as rows, on shifted views of one padded copy.

NaN and inf propagate through the sums (the NaN rule in ``kernels/base.py``).
Only where a non-finite value meets the zero padding does the formulation
decide: im2col multiplies the padding (0 * NaN is NaN, as the reference's
forward), the direct kernels skip it (as the reference's input gradient, a
scatter, does). So a NaN weight may leave border pixels finite in the direct
forward, or make them NaN in the im2col input gradient where the reference
has finite values; every pixel that reads real data through it is NaN
either way.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit
from numba.core.compiler_lock import global_compiler_lock

from minunet.kernels.numba import conv_shifted, threads
from minunet.kernels.numba.conv_direct_kernels import (
    OB,
    conv_direct,
    conv_direct8,
    conv_dw_direct1,
    conv_dw_direct4,
    conv_dw_direct8,
    conv_dw_direct16,
)
from minunet.kernels.numba.threads import JIT


class ConvCache(NamedTuple):
    x: np.ndarray  # (N,H,W,Cin) NHWC input
    w: np.ndarray  # (Cout,Cin,k,k) PyTorch layout
    y: np.ndarray | None  # (N,H,W,Cout) output after ReLU, when fused


# -- im2col + GEMM ---------------------------------------------------------------


@njit(**JIT)
def _im2col(x, r0, r1, k, col):
    """col[(r-r0)*W + w, (i*k + j)*C + c] = xpad[n, h+i-p, w+j-p, c] for image rows r = n*H + h in [r0, r1).

    x (N,H,W,C) NHWC; col ((r1-r0)*W, k*k*C); zero padding p = k//2. For a
    fixed (pixel, i) the k taps j are k*C contiguous values of x's row h+i-p,
    so a pixel's column is k contiguous copies."""
    N, H, W, C = x.shape
    p = k // 2
    kc = k * C
    kkc = k * kc
    xf = x.reshape(N * H * W * C)
    cf = col.reshape(col.size)
    for r in range(r0, r1):
        n = r // H
        h = r - n * H
        for i in range(k):
            hs = h + i - p
            for w in range(W):
                d = ((r - r0) * W + w) * kkc + i * kc
                if hs < 0 or hs >= H:
                    cf[d : d + kc] = 0
                    continue
                s = ((n * H + hs) * W + w - p) * C  # x[n, hs, w-p, 0]; only taps inside [0, W) are read
                jlo = max(0, p - w)
                jhi = min(k, W - w + p)
                if C >= 8:
                    cf[d : d + jlo * C] = 0
                    cf[d + jlo * C : d + jhi * C] = xf[s + jlo * C : s + jhi * C]
                    cf[d + jhi * C : d + kc] = 0
                else:  # few channels: a plain loop beats slice copies
                    for t in range(kc):
                        if jlo * C <= t < jhi * C:
                            cf[d + t] = xf[s + t]
                        else:
                            cf[d + t] = 0


@njit(**JIT)
def _matmul_small_k(a, b, out):
    """out (M, N) = a (M, K) @ b (K, N) for a small K (BLAS is slow there: K = 1 takes numpy's slow path)."""
    M, K = a.shape
    N = b.shape[1]
    for m in range(M):
        for o in range(N):
            out[m, o] = 0
        for c in range(K):
            v = a[m, c]
            for o in range(N):
                out[m, o] += v * b[c, o]


@njit(**JIT)
def _bias_act(y, b, relu):
    """In place on y (M, Cout): y += b, then max(y, 0) when relu (NaN stays NaN: NaN < 0 is false)."""
    M, C = y.shape
    for m in range(M):
        for o in range(C):
            v = y[m, o] + b[o]
            if relu and v < 0:
                y[m, o] = 0
            else:
                y[m, o] = v


def _conv_rows(x, wmat, k, b, relu, out2d):
    """out2d (P, Cout) = im2col(x) @ wmat (+ b, then ReLU), chunk by chunk of image rows.

    x (N,H,W,Cin) NHWC; wmat (k*k*Cin, Cout) with rows ordered (i, j, c); b None for no bias."""
    N, H, W, Cin = x.shape
    K = wmat.shape[0]

    def chunk(r0, r1):
        yc = out2d[r0 * W : r1 * W]  # (rows*W, Cout)
        if k == 1:
            rows = x.reshape(N * H * W, Cin)[r0 * W : r1 * W]
            if K < 8:
                _matmul_small_k(rows, wmat, yc)
            else:
                np.dot(rows, wmat, out=yc)
        else:
            col = threads.tls_buffer((per * W, K), x.dtype)[: (r1 - r0) * W]
            _im2col(x, r0, r1, k, col)
            np.dot(col, wmat, out=yc)
        if b is not None:
            _bias_act(yc, b, relu)

    per = max(1, threads.COL_ELEMS // (W * K))
    threads.run(chunk, threads.ranges(N * H, per))


# -- direct kernels (few channels) -------------------------------------------------

def _host_has_avx512():
    """Whether the CPU Numba compiles for has AVX-512 (32 vector registers of 16 float32)."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


# The register blocks by vector width (the same sums in the same order, so the same bytes either
# way; benchmarks/README.md, "AVX-512 register blocks"). "narrow" (AVX2, 16 registers of 8 float32):
# 4 pixels x 16 outputs, weight gradient 4 inputs x 16 outputs, 8 registers each. "wide"
# (AVX-512): 8 pixels x 16 outputs and 16 inputs x 16 outputs, 8 and 16 of its 32 registers; with
# the narrow blocks an AVX-512 machine has 4 accumulators, too few to hide the FMA latency.
# Measured at 8x256x256 on a Zen 5: 16->16 forward 14.1 -> 9.8 ms, weight gradient 13.8 -> 8.1 ms.
VARIANT = "wide" if _host_has_avx512() else "narrow"
variant_force = None  # None: by the host; "narrow" or "wide" (tests)


def _variant():
    return variant_force or VARIANT


def direct_kernel():
    """The forward (and input-gradient) kernel of this machine's register blocks."""
    return conv_direct8 if _variant() == "wide" else conv_direct


def dw_kernel(Cin):
    """The weight-gradient kernel for Cin input channels: the widest block of input channels that
    divides Cin (16, 8 on AVX-512; 4) or one channel at a time."""
    blocks = ((16, conv_dw_direct16), (8, conv_dw_direct8)) if _variant() == "wide" else ()
    for cb, kernel in blocks + ((4, conv_dw_direct4),):
        if Cin % cb == 0:
            return kernel
    return conv_dw_direct1


# The rule: which parts of a 3x3 conv go to the direct kernels rather than to im2col + BLAS, by
# measurement (interleaved medians, every 3x3 conv of the U-Net at base 16 and 32; tables in
# benchmarks/README.md). It depends on both sides: this machine's register blocks and the GEMM
# kernels OpenBLAS runs. A conv "as run" has Cout outputs: the input gradient is a conv from the
# layer's Cout to its Cin channels, so there the rule sees Cin as the outputs.
#
# narrow blocks (AVX2; measured on a Zen 3, where OpenBLAS runs its Haswell kernels): conv_direct
# wins while its outputs are few and the image wide (64->32 @128: 41 vs 81 ms; 128->64 @64: 49 vs
# 59 ms), BLAS from 128 outputs or at 32x32 and below (128->128 @32: 38 vs 25 ms); up to 32
# channels in and out it wins at every width. The weight-gradient kernel wins up to 32 outputs and
# 64 inputs (64->32 @128: 73 vs 88 ms; 32->64 @64: 21 vs 14 ms).
DIRECT_FEW = 32
DIRECT_MAX_OUT, DIRECT_MAX_IN, DIRECT_MIN_W = 64, 128, 64
DW_DIRECT_MAX_OUT, DW_DIRECT_MAX_IN = 32, 64
# wide blocks (AVX-512; measured on a Zen 5): with OpenBLAS's AVX-512 kernels (SkylakeX and
# later) the direct kernels win up to 64 outputs at any level (128->64 @64: 19 vs 22 ms; 64->128
# @32: 5.4 vs 4.5), the weight gradient up to 128 outputs (256->128 @32: 14.5 vs 16.1; 128->256
# @16: 5.0 vs 4.2); with its AVX2 kernels (OPENBLAS_CORETYPE=Haswell) the forward wins up to 128
# outputs (256->128 @64: 81 vs 114 ms; 128->256 @32: 30 vs 25) and the weight gradient at every
# shape measured (1024->512 @32, batch 4: 162 vs 575 ms).
WIDE_MAX_OUT = {True: 64, False: 128}  # by BLAS_AVX512
WIDE_DW_MAX_OUT = {True: 128, False: None}  # None: no limit
AVX512_BLAS_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
BLAS_AVX512 = threads.openblas_corename() in AVX512_BLAS_CORES
direct_force = None  # None: the rule; True/False: always/never the direct path where the blocks fit (tests)


def use_direct(Cin, Cout, k, W):
    """conv_direct for a k x k conv of Cin to Cout channels on rows W pixels wide: k > 1, Cout a
    multiple of OB (16), and (by the rule above, unless forced) with the narrow blocks Cin, Cout
    <= 32, or Cout <= 64, Cin <= 128 and W >= 64; with the wide blocks Cout <= 64 (OpenBLAS on
    AVX-512 kernels) or <= 128 (on AVX2 kernels)."""
    if k == 1 or Cout % OB:
        return False
    if direct_force is not None:
        return direct_force
    if _variant() == "wide":
        return Cout <= WIDE_MAX_OUT[BLAS_AVX512]
    if Cin <= DIRECT_FEW and Cout <= DIRECT_FEW:
        return True
    return Cout <= DIRECT_MAX_OUT and Cin <= DIRECT_MAX_IN and W >= DIRECT_MIN_W


def use_direct_dw(Cin, Cout, k):
    """The direct weight-gradient kernel: k > 1, Cout a multiple of OB, and (by the rule above,
    unless forced) with the narrow blocks Cout <= 32 and Cin <= 64; with the wide blocks Cout <=
    128 (OpenBLAS on AVX-512 kernels) or any (on AVX2 kernels)."""
    if k == 1 or Cout % OB:
        return False
    if direct_force is not None:
        return direct_force
    if _variant() == "wide":
        cap = WIDE_DW_MAX_OUT[BLAS_AVX512]
        return cap is None or Cout <= cap
    return Cout <= DW_DIRECT_MAX_OUT and Cin <= DW_DIRECT_MAX_IN


# shifted GEMMs (conv_shifted.py) in place of im2col + BLAS where im2col's chunks (about 2 MB of
# columns) hold few pixels: images up to 64 wide, or k*k*Cin >= 2048 (under 256 pixels per chunk).
# Measured on a Zen 5 with OpenBLAS's SkylakeX kernels, batch 4, ms (im2col -> shifted): forward
# 1024->1024 @16 111 -> 91, 1024->512 @32 162 -> 106, 512->256 @64 114 -> 96, 256->128 @128 128
# -> 100 (Haswell kernels 203 -> 178), level at 256->256 @64 (48) and 128->128 @128 (58 -> 55),
# slower at 64->128 @256 (114 -> 120) and 128->256 @128 (96 -> 100); weight gradient 1024->1024
# @16 141 -> 54, 1024->512 @32 259 -> 99, 512->512 @32 59 -> 49, but 256->256 @64 50 -> 59 and
# 128->128 @128 52 -> 77.
SHIFTED_MAX_W, SHIFTED_MIN_K, SHIFTED_DW_MAX_W = 64, 2048, 32
shifted_force = None  # None: the rule; True/False: always/never the shifted path where im2col would run (tests)


def use_shifted(Cin, Cout, k, W):
    """conv_shifted in place of im2col + BLAS for a k x k conv (forward or input gradient) on rows W
    pixels wide: k > 1, not a direct-kernel shape, and (by the rule above, unless forced) W <= 64
    or k*k*Cin >= 2048."""
    if k == 1 or use_direct(Cin, Cout, k, W):
        return False
    if shifted_force is not None:
        return shifted_force
    return W <= SHIFTED_MAX_W or k * k * Cin >= SHIFTED_MIN_K


def use_shifted_dw(Cin, Cout, k, W):
    """The shifted weight gradient in place of im2col's: k > 1, not a direct-kernel shape, and (by the
    rule above, unless forced) W <= 32."""
    if k == 1 or use_direct_dw(Cin, Cout, k):
        return False
    if shifted_force is not None:
        return shifted_force
    return W <= SHIFTED_DW_MAX_W


def compile_with_slp(kernel, *args):
    """Compile kernel for these arguments' types (or load it from the cache) with LLVM's SLP
    vectoriser switched on, before the pool's threads call it.

    The direct kernels' register blocks are rows of scalar variables that only
    the SLP vectoriser turns into vector registers, and Numba switches SLP off
    by default (``numba.core.config.SLP_VECTORIZE``). Numba reads the switch
    when it builds each pass pipeline, so it is on for this one compilation
    only, under the global compiler lock, which keeps every other compilation
    from seeing it."""
    sig = tuple(numba.typeof(a) for a in args)
    if sig in kernel.overloads:
        return
    with global_compiler_lock:
        if sig in kernel.overloads:
            return
        old = numba.core.config.SLP_VECTORIZE
        numba.core.config.SLP_VECTORIZE = 1
        try:
            kernel.compile(sig)
        finally:
            numba.core.config.SLP_VECTORIZE = old


def _conv_direct_rows(x, wt, b, relu, y):
    """y (N,H,W,Cout) = conv(x, wt) + b (then ReLU) with conv_direct, chunk by chunk of image rows.

    x (N,H,W,Cin) NHWC; wt (k,k,Cin,Cout), wt[i,j,c,o] = w[o,c,i,j]; b (Cout,)."""
    N, H, W, Cin = x.shape
    relu = bool(relu)
    kernel = direct_kernel()
    compile_with_slp(kernel, x, wt, b, relu, y, 0, 1)
    per = max(1, threads.ELEMS // (W * max(Cin, wt.shape[3])))
    threads.run(lambda r0, r1: kernel(x, wt, b, relu, y, r0, r1), threads.ranges(N * H, per))


# -- gradients --------------------------------------------------------------------


@njit(**JIT)
def _relu_mask_colsum(dy, y, dz, out):
    """dz = dy * [y > 0]; out (C,) float64 = sum_m dz[m, :].   dy, y, dz (M, C).

    A product, as the ReLU backward: a NaN or inf in dy gives NaN even where y <= 0."""
    M, C = dy.shape
    out[:] = 0
    one, zero = np.ones(1, dz.dtype)[0], np.zeros(1, dz.dtype)[0]
    for m in range(M):
        for o in range(C):
            v = dy[m, o] * (one if y[m, o] > 0 else zero)  # a select of the factor, not a branch: y > 0 is a coin toss
            dz[m, o] = v
            out[o] += v


@njit(**JIT)
def colsum(a, out):
    """out (C,) float64 = sum_m a[m, :] for a (M, C)."""
    M, C = a.shape
    out[:] = 0
    for m in range(M):
        for o in range(C):
            out[o] += a[m, o]


def _dz_db_rows(dy2d, y2d, dz2d, lo, hi):
    """Rows lo..hi-1: dz = dy * [y > 0] into dz2d (dz = dy when y2d is None: dz2d is dy2d); returns
    their db partial (Cout,) float64."""
    db = np.empty(dy2d.shape[1], np.float64)
    if y2d is not None:
        _relu_mask_colsum(dy2d[lo:hi], y2d[lo:hi], dz2d[lo:hi], db)
    else:
        colsum(dz2d[lo:hi], db)
    return db


def _conv_grads(x, dy2d, y2d, k, dz2d):
    """Per chunk of image rows: dz = dy * [y > 0] (or dy when y is None) into dz2d, the chunk's
    db (float64) and dw partial im2col(x)^T @ dz (or the direct kernel's); the partials are
    added in chunk order. Returns (dwmat (k*k*Cin, Cout), db (Cout,) float64)."""
    N, H, W, Cin = x.shape
    Cout = dy2d.shape[1]
    K = k * k * Cin
    direct = use_direct_dw(Cin, Cout, k)
    if direct:  # about 2**18 values of x and dz rows per chunk (1 MB in float32; measured 16-32 rows best at W 256)
        per = max(1, threads.ELEMS // (W * (Cin + Cout)))
        dz4d = dz2d.reshape(N, H, W, Cout)
        dwk = dw_kernel(Cin)
        compile_with_slp(dwk, x, dz4d, k, np.zeros((k, k, Cin, Cout), x.dtype), 0, 1)
    else:
        per = max(1, threads.COL_ELEMS // (W * K))

    def chunk(r0, r1):
        lo, hi = r0 * W, r1 * W
        db = _dz_db_rows(dy2d, y2d, dz2d, lo, hi)
        if direct:
            dw = np.zeros((k, k, Cin, Cout), x.dtype)
            dwk(x, dz4d, k, dw, r0, r1)
            return dw.reshape(K, Cout), db
        if k == 1:
            col = x.reshape(N * H * W, Cin)[lo:hi]
        else:
            col = threads.tls_buffer((per * W, K), x.dtype)[: hi - lo]
            _im2col(x, r0, r1, k, col)
        return col.T @ dz2d[lo:hi], db

    return threads.run_sum(chunk, threads.ranges(N * H, per))


# -- weight layouts --------------------------------------------------------------------
# The model keeps PyTorch's (Cout, Cin, k, k); the kernels read (k, k, Cin, Cout). NumPy's strided
# transpose of a 1024 x 1024 x 3 x 3 weight took 35 ms (and 55 ms back for its gradient), a
# tenth of that conv's step; these tiled copies on the pool take a few ms.

TILE = 16


@njit(**JIT)
def _to_taps(w, out, o0, o1):
    """out[i, j, c, o] = w[o, c, i, j] for o in [o0, o1), in tiles of TILE x TILE (o, c):
    w (Cout, Cin, k, k), out (k, k, Cin, Cout)."""
    _, Cin, k, _ = w.shape
    for ob in range(o0, o1, TILE):
        oe = min(ob + TILE, o1)
        for cb in range(0, Cin, TILE):
            ce = min(cb + TILE, Cin)
            for i in range(k):
                for j in range(k):
                    for c in range(cb, ce):
                        for o in range(ob, oe):
                            out[i, j, c, o] = w[o, c, i, j]


@njit(**JIT)
def _from_taps(wt, out, o0, o1):
    """out[o, c, i, j] = wt[i, j, c, o] for o in [o0, o1) (the inverse of _to_taps)."""
    k, _, Cin, _ = wt.shape
    for ob in range(o0, o1, TILE):
        oe = min(ob + TILE, o1)
        for cb in range(0, Cin, TILE):
            ce = min(cb + TILE, Cin)
            for o in range(ob, oe):
                for c in range(cb, ce):
                    for i in range(k):
                        for j in range(k):
                            out[o, c, i, j] = wt[i, j, c, o]


def to_taps(w, dtype):
    """w (Cout, Cin, k, k) -> (k, k, Cin, Cout) in dtype, contiguous."""
    w = np.ascontiguousarray(w, dtype=dtype)
    out = np.empty(w.shape[2:] + w.shape[1::-1], dtype)
    threads.run(lambda o0, o1: _to_taps(w, out, o0, o1), threads.ranges(w.shape[0], 4 * TILE))
    return out


def from_taps(wt, dtype):
    """wt (k, k, Cin, Cout) -> (Cout, Cin, k, k) in dtype, contiguous."""
    wt = np.ascontiguousarray(wt, dtype=dtype)
    out = np.empty(wt.shape[3:1:-1] + wt.shape[:2], dtype)
    threads.run(lambda o0, o1: _from_taps(wt, out, o0, o1), threads.ranges(wt.shape[3], 4 * TILE))
    return out


# -- the ops -------------------------------------------------------------------------


def conv2d_forward(x, w, b, relu=False):
    """y[n,h,w,o] = b[o] + sum_{i,j,c} xpad[n,h+i,w+j,c] * w[o,c,i,j], then max(y,0) if relu.

    x (N,H,W,Cin) NHWC, w (Cout,Cin,k,k), k odd, zero pad k//2 -> y (N,H,W,Cout).
    As a matrix product: Y (P,Cout) = col (P, k*k*Cin) @ Wmat, Wmat[(i,j,c), o] = w[o,c,i,j]."""
    x = np.ascontiguousarray(x)
    N, H, W, Cin = x.shape
    Cout, _, k, _ = w.shape
    y = np.empty((N, H, W, Cout), x.dtype)
    b = np.ascontiguousarray(b, dtype=x.dtype)
    wt = to_taps(w, x.dtype)  # (k, k, Cin, Cout)
    if use_direct(Cin, Cout, k, W):
        _conv_direct_rows(x, wt, b, relu, y)
    elif use_shifted(Cin, Cout, k, W):
        conv_shifted.conv(x, wt, b, relu, y)
    else:
        _conv_rows(x, wt.reshape(k * k * Cin, Cout), k, b, relu, y.reshape(N * H * W, Cout))
    return y, ConvCache(x, w, y if relu else None)


def _dz_and_db(dy2d, y2d, dz2d):
    """dz = dy * [y > 0] into dz2d (or dz = dy when y2d is None: dz2d is dy2d) and db (float64) =
    the column sums of dz, by chunks of rows added in chunk order. dy2d, y2d, dz2d (P, Cout)."""
    P, Cout = dy2d.shape
    chunks = threads.ranges(P, max(1, threads.ELEMS // Cout))
    return threads.run_sum(lambda lo, hi: (_dz_db_rows(dy2d, y2d, dz2d, lo, hi),), chunks)[0]


def conv2d_backward(dy, cache, need_dx=True):
    """dz = dy * [y > 0] (fused ReLU) or dy;
        db[o]       = sum_{n,h,w} dz[n,h,w,o]
        dw[o,c,i,j] = sum_{n,h,w} dz[n,h,w,o] * xpad[n,h+i,w+j,c]   (col^T @ dz, or conv_shifted's taps)
        dx          = conv(dz, w') with w'[c,o,i,j] = w[o,c,k-1-i,k-1-j]   (the adjoint, pad k//2).
    dy (N,H,W,Cout) -> (dx (N,H,W,Cin) or None, dw (Cout,Cin,k,k), db (Cout))."""
    x, w, y = cache
    N, H, W, Cin = x.shape
    Cout, _, k, _ = w.shape
    P = N * H * W
    dy2d = np.ascontiguousarray(dy).reshape(P, Cout)
    y2d = None if y is None else y.reshape(P, Cout)
    dz2d = dy2d if y is None else np.empty((P, Cout), x.dtype)
    _, S, R, M, _ = conv_shifted.geometry(N, H, W, k)
    Bdz = None  # dz in the shifted layout, when a shifted part made it
    Bx = None
    if use_shifted_dw(Cin, Cout, k, W):
        Bx, finite = conv_shifted.to_layout(x, k)
        if not finite:  # a non-finite x takes im2col (conv_shifted's docstring: the NaN rule)
            Bx = None
    if Bx is not None:
        db = _dz_and_db(dy2d, y2d, dz2d)
        Bdz, _ = conv_shifted.to_layout(dz2d.reshape(N, H, W, Cout), k)
        dwmat = conv_shifted.weight_grad(Bx, Bdz, k, S, M).reshape(k * k * Cin, Cout)
        del Bx
    else:
        dwmat, db = _conv_grads(x, dy2d, y2d, k, dz2d)
    dw = from_taps(dwmat.reshape(k, k, Cin, Cout), w.dtype)
    dx = None
    if need_dx:
        # flipped kernel: wflip[(i,j,o), c] = w[o, c, k-1-i, k-1-j]
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1), x.dtype)  # (k,k,Cout,Cin)
        dx = np.empty((N, H, W, Cin), x.dtype)
        dz4d = dz2d.reshape(N, H, W, Cout)
        if use_direct(Cout, Cin, k, W):
            _conv_direct_rows(dz4d, wflip, np.zeros(Cin, x.dtype), False, dx)
        elif use_shifted(Cout, Cin, k, W):
            if Bdz is None:
                Bdz, _ = conv_shifted.to_layout(dz4d, k)
            conv_shifted.conv_layout(Bdz, wflip, S, R, None, False, dx)
        else:
            _conv_rows(dz4d, wflip.reshape(k * k * Cout, Cin), k, None, False, dx.reshape(P, Cin))
    return dx, dw, db.astype(w.dtype)
