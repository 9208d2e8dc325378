"""The Numba CPU backend: Numba kernels and BLAS, on a small pool of threads.

Same ops and semantics as the NumPy reference (``numpy_ref.py``, the spec);
float32 or float64. Activations are held channels-last, NHWC, between
``from_nchw`` and ``to_nchw``: every op below takes and returns NHWC arrays
(the shapes in the docstrings are the logical NCHW ones, the comments give the
memory layout). Parameters stay in PyTorch layouts; each op rearranges its
(small) weight into the matrix it multiplies by.

Strategy, chosen by measurement (see ``benchmarks/README.md``):
- Every op splits its work into chunks of image rows whose boundaries depend
  only on the shapes, and a pool of one thread per core takes chunks from a
  queue. Each chunk runs serial ``nogil`` Numba kernels and single-threaded
  BLAS. There is no fork/join barrier per chunk, so a busy machine (other
  processes on the cores) slows the op in proportion instead of stalling
  every parallel region; on a shared 2-core machine this measured 30x faster
  than Numba ``prange`` loops around multi-threaded BLAS calls.
- conv k x k: per chunk, im2col into a per-thread buffer of about 2 MB (it
  stays in cache), one GEMM into the output rows, bias and ReLU fused in one
  pass over the rows still in cache. No full-size column buffer is built.
  The input gradient is the same convolution of dz with the flipped,
  transposed kernel; the weight gradient is a per-chunk col^T @ dz.
- conv k x k with few channels (Cin, Cout <= 32, Cout a multiple of 16: the
  full-resolution U-Net level, where the GEMM is thin and im2col copies 9x):
  direct kernels instead, a register block of 4 pixels x 16 outputs summed
  over taps and input channels (forward and input gradient), and of 4 (or 1)
  input x 16 output channels summed over a chunk's pixels (weight gradient).
  Measured at 8x256x256: 16->16 forward 38 -> 15 ms, backward 94 -> 33 ms.
- 1x1 conv, 2x2 up-conv: a GEMM per chunk of pixels, plus a scatter/gather
  of the 2x2 blocks for the up-conv.

Determinism: chunk boundaries are fixed by the shapes, each chunk writes only
its own rows, and reductions (db, dw) keep one partial per chunk that are
added in chunk order after all chunks finish. Which thread ran a chunk does
not matter, so the same inputs give the same bytes run after run.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np
from numba import njit
from numba.core.compiler_lock import global_compiler_lock

from minunet.kernels.base import check_dtype

_JIT = dict(cache=True, fastmath=False, nogil=True)

# Work per chunk. Conv: about 2**19 im2col values (2 MB in float32) per chunk;
# elementwise ops: about 2**18 values.
_COL_ELEMS = 1 << 19
_ELEMS = 1 << 18


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
# Threads: a pool of one worker per core, and single-threaded BLAS inside it.
# ---------------------------------------------------------------------------

_pool = None
_pool_pid = None
_pool_lock = threading.Lock()


def _workers() -> int:
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def _run(fn, chunks):
    """[fn(*c) for c in chunks], the chunks shared out to the pool (in the caller's thread if one)."""
    global _pool, _pool_pid
    if len(chunks) <= 1 or _workers() == 1:
        return [fn(*c) for c in chunks]
    if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the parent's threads
        with _pool_lock:
            if _pool is None or _pool_pid != os.getpid():
                _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="minunet-numba")
                _pool_pid = os.getpid()
    with _single_threaded_blas():
        return list(_pool.map(lambda c: fn(*c), chunks))


def _ranges(total, per):
    """[(lo, hi)] covering range(total) in steps of per (>= 1): the chunk boundaries."""
    per = max(1, int(per))
    return [(lo, min(total, lo + per)) for lo in range(0, total, per)]


def _find_openblas():
    """ctypes handles (get, set) of the thread count of NumPy's bundled OpenBLAS, or None."""
    libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in (
            ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"),
        ):
            if hasattr(lib, get) and hasattr(lib, set_):
                getter, setter = getattr(lib, get), getattr(lib, set_)
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                return getter, setter
    return None


_openblas = _find_openblas()
_blas_lock = threading.Lock()
_blas_depth = [0, 0]  # [ops inside _single_threaded_blas now, thread count to restore]


@contextmanager
def _single_threaded_blas():
    """BLAS on one thread while the pool's workers each call it; the caller's setting comes back after
    the last op that asked for it (ops running at once from several threads nest correctly).

    Without NumPy's OpenBLAS (another BLAS build) this does nothing: results
    are the same, only slower from oversubscribed threads."""
    if _openblas is None:
        yield
        return
    get, set_ = _openblas
    with _blas_lock:
        if _blas_depth[0] == 0:
            _blas_depth[1] = get()
            set_(1)
        _blas_depth[0] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth[0] -= 1
            if _blas_depth[0] == 0:
                set_(_blas_depth[1])


def _tls_buffer(shape, dtype):
    """A scratch array private to the calling thread: a view of one flat buffer per dtype that grows
    to the largest request and is reused across calls (never returned to the caller)."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    dtype = np.dtype(dtype)
    need = int(np.prod(shape))
    flat = bufs.get(dtype.str)
    if flat is None or flat.size < need:
        flat = bufs[dtype.str] = np.empty(need, dtype)
    return flat[:need].reshape(shape)


_tls = threading.local()


# ---------------------------------------------------------------------------
# Kernels: serial, nogil; each works on one chunk. "P" is N*H*W (pixels).
# ---------------------------------------------------------------------------


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
def _bias_act(y, b, relu):
    """In place on y (M, Cout): y += b, then max(y, 0) when relu."""
    M, C = y.shape
    for m in range(M):
        for o in range(C):
            v = y[m, o] + b[o]
            if relu and v < 0:
                y[m, o] = 0
            else:
                y[m, o] = v


@njit(**_JIT)
def _relu_mask_colsum(dy, y, dz, out):
    """dz = dy * [y > 0]; out (C,) float64 = sum_m dz[m, :].   dy, y, dz (M, C)."""
    M, C = dy.shape
    out[:] = 0
    zero = np.zeros(1, dz.dtype)[0]
    for m in range(M):
        for o in range(C):
            v = dy[m, o] if y[m, o] > 0 else zero  # a select, not a branch: y > 0 is a coin toss
            dz[m, o] = v
            out[o] += v


@njit(**_JIT)
def _colsum(a, out):
    """out (C,) float64 = sum_m a[m, :] for a (M, C)."""
    M, C = a.shape
    out[:] = 0
    for m in range(M):
        for o in range(C):
            out[o] += a[m, o]


@njit(**_JIT)
def _relu_fwd(x, y):
    """y = max(x, 0), flat arrays."""
    for i in range(x.size):
        v = x[i]
        if v < 0:
            y[i] = 0
        else:
            y[i] = v


@njit(**_JIT)
def _relu_bwd(dy, y, dx):
    """dx = dy * [y > 0], flat arrays."""
    for i in range(dy.size):
        if y[i] > 0:
            dx[i] = dy[i]
        else:
            dx[i] = 0


@njit(**_JIT)
def _maxpool_fwd(x, y, am, r0, r1):
    """x (N,H,W,C) -> y (N,H/2,W/2,C), am uint8 window index of the first maximum; output rows [r0, r1).

    Window order: 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1). A NaN wins as in np.argmax."""
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


@njit(**_JIT)
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


@njit(**_JIT)
def _upconv_scatter(z, b, y, r0):
    """y[n, 2h+i, 2w+j, o] = z[(r-r0)*W + w, (i*2+j)*Cout + o] + b[o] for input rows r = n*H + h.

    z (rows*W, 4*Cout) holds input rows [r0, r0 + rows); y (N,2H,2W,Cout)."""
    N, H2, W2, Co = y.shape
    H, W = H2 // 2, W2 // 2
    for rr in range(z.shape[0] // W):
        r = r0 + rr
        n = r // H
        h = r - n * H
        for i in range(2):
            for w in range(W):
                zr = rr * W + w
                for j in range(2):
                    zc = (i * 2 + j) * Co
                    for o in range(Co):
                        y[n, 2 * h + i, 2 * w + j, o] = z[zr, zc + o] + b[o]


@njit(**_JIT)
def _upconv_gather(dy, dz, r0):
    """dz[(r-r0)*W + w, (i*2+j)*Cout + o] = dy[n, 2h+i, 2w+j, o]: the adjoint of the scatter."""
    N, H2, W2, Co = dy.shape
    H, W = H2 // 2, W2 // 2
    for rr in range(dz.shape[0] // W):
        r = r0 + rr
        n = r // H
        h = r - n * H
        for w in range(W):
            zr = rr * W + w
            for i in range(2):
                for j in range(2):
                    zc = (i * 2 + j) * Co
                    for o in range(Co):
                        dz[zr, zc + o] = dy[n, 2 * h + i, 2 * w + j, o]


@njit(**_JIT)
def _concat_last(a, b, out):
    """out[p, :Ca] = a[p], out[p, Ca:] = b[p]; a (P,Ca), b (P,Cb), out (P,Ca+Cb)."""
    P, Ca = a.shape
    Cb = b.shape[1]
    for p in range(P):
        for c in range(Ca):
            out[p, c] = a[p, c]
        for c in range(Cb):
            out[p, Ca + c] = b[p, c]


@njit(**_JIT)
def _split_last(d, a, b):
    """a[p] = d[p, :Ca], b[p] = d[p, Ca:]: the adjoint of the concat."""
    P, Ca = a.shape
    Cb = b.shape[1]
    for p in range(P):
        for c in range(Ca):
            a[p, c] = d[p, c]
        for c in range(Cb):
            b[p, c] = d[p, Ca + c]


@njit(**_JIT)
def _sigmoid(z, s):
    """s = 1/(1+exp(-z)) for z >= 0, exp(z)/(1+exp(z)) otherwise (exp only sees -|z|); flat arrays."""
    for i in range(z.size):
        v = z[i]
        e = np.exp(-abs(v))
        s[i] = 1 / (1 + e) if v >= 0 else e / (1 + e)


@njit(**_JIT)
def _sigmoid_bce(z, y, dz, size):
    """Per pixel l = max(z,0) - z*y + log1p(exp(-|z|)), dz = (sigmoid(z) - y) / size; returns sum(l) (float64)."""
    acc = 0.0
    for i in range(z.size):
        v = z[i]
        t = y[i]
        e = np.exp(-abs(v))
        acc += (max(v, 0) - v * t) + np.log1p(e)
        s = 1 / (1 + e) if v >= 0 else e / (1 + e)
        dz[i] = (s - t) / size
    return acc


@njit(**_JIT)
def _adam(p, g, m, v, lr, b1, b2, eps, c1, c2, omb1, omb2):
    """The reference's Adam, operation for operation, in the arrays' dtype (all scalars already cast;
    omb1 = 1-b1 and omb2 = 1-b2 rounded once from float64, c1 = 1-b1^t, c2 = 1-b2^t)."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1 + omb1 * gi
        vi = v[i] * b2 + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


# ---------------------------------------------------------------------------
# Direct convolution for few channels (the full-resolution level of the U-Net).
#
# With Cout = 16 the im2col GEMM is thin (N = 16, K = 9*Cin) and memory-bound,
# and im2col itself copies the input 9 times. These kernels skip the column
# matrix: a block of output values lives in registers while the loops run
# over the taps and input channels. The block is written out as scalar
# variables by the generator below (Numba has no fixed-size register arrays);
# LLVM's SLP vectoriser turns each row of 16 into one AVX-512 (or two AVX2)
# registers. Numba switches SLP off by default, so these kernels are compiled
# with it switched on (``_compile_slp``), and with fastmath 'contract' only:
# a*b + c may become one FMA (no reassociation, no other fast-math), which
# is fixed once the kernel is compiled, so results stay bitwise the same run
# after run. Indices are uint64 so Numba emits no negative-index wraparound
# (which otherwise turns the vector loads into gathers).
# ---------------------------------------------------------------------------

_DIRECT_PB = 4  # output pixels per register block (forward)
_DIRECT_OB = 16  # output channels per register block
_DIRECT_MAX_C = 32  # rule: the direct path when Cin, Cout <= 32 (and the block sizes divide them)
_direct_force = None  # None: the rule above; True/False: always/never the direct path (tests)


def _gen(ind, fmt, **ranges):
    """One line per combination of the ranges' values, e.g. _gen(4, "a{q}_{o} = 0", q=2, o=3)."""
    keys = list(ranges)
    combos = [{}]
    for key in keys:
        combos = [{**c, key: v} for c in combos for v in range(ranges[key])]
    return "\n".join(" " * ind + fmt.format(**c) for c in combos)


def _direct_fwd_source(PB, OB):
    """Source of _conv_direct: y = conv(x, wt) + b (then ReLU), image rows [r0, r1).

    x (N,H,W,Cin) NHWC; wt (k,k,Cin,Cout), wt[i,j,c,o] = w[o,c,i,j]; b (Cout,);
    y (N,H,W,Cout); Cout a multiple of OB. For output pixel (h, w) and channel o:
        y[n,h,w,o] = b[o] + sum_{i,j,c} xpad[n, h+i-p, w+j-p, c] * wt[i,j,c,o],  p = k//2.
    Register block: PB neighbouring pixels x OB channels (a{q}_{o}); per (tap, c)
    one row wt[i,j,c,ob:ob+OB] (u{o}) times PB input values (v{q}). Pixels whose
    taps leave the image (the first and last p of a row) take the one-pixel
    loop with the tap range clipped; rows outside the image are skipped."""
    return f'''
def _conv_direct(x, wt, b, relu, y, r0, r1):
    N, H, W, Cin = x.shape
    k = wt.shape[0]
    Cout = wt.shape[3]
    p = k // 2
    xf = x.reshape(x.size)
    wf = wt.reshape(wt.size)
    yf = y.reshape(y.size)
    zero = np.zeros(1, y.dtype)[0]
{_gen(4, "K{o} = np.uint64({o})", o=OB)}
{_gen(4, "Q{q} = np.uint64({q} * Cin)", q=PB)}
{_gen(4, "R{q} = np.uint64({q} * Cout)", q=PB)}
    for r in range(r0, r1):
        n = r // H
        h = r - n * H
        for ob in range(0, Cout, {OB}):
            w0 = 0
            while w0 < W:
                if w0 >= p and w0 + {PB} + p <= W:
{_gen(20, "a{q}_{o} = b[ob + {o}]", q=PB, o=OB)}
                    for i in range(k):
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        for j in range(k):
                            xb = ((n * H + hs) * W + w0 + j - p) * Cin
                            wb = (i * k + j) * Cin * Cout + ob
                            for c in range(Cin):
                                wc = np.uint64(wb + c * Cout)
                                xc = np.uint64(xb + c)
{_gen(32, "u{o} = wf[wc + K{o}]", o=OB)}
{_gen(32, "v{q} = xf[xc + Q{q}]", q=PB)}
{_gen(32, "a{q}_{o} += v{q} * u{o}", q=PB, o=OB)}
                    yb = np.uint64((r * W + w0) * Cout + ob)
                    if relu:
{_gen(24, "yf[yb + R{q} + K{o}] = zero if a{q}_{o} < zero else a{q}_{o}", q=PB, o=OB)}
                    else:
{_gen(24, "yf[yb + R{q} + K{o}] = a{q}_{o}", q=PB, o=OB)}
                    w0 += {PB}
                else:
{_gen(20, "a{o} = b[ob + {o}]", o=OB)}
                    jlo = max(0, p - w0)
                    jhi = min(k, W - w0 + p)
                    for i in range(k):
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        for j in range(jlo, jhi):
                            xb = ((n * H + hs) * W + w0 + j - p) * Cin
                            wb = (i * k + j) * Cin * Cout + ob
                            for c in range(Cin):
                                wc = np.uint64(wb + c * Cout)
                                v = xf[xb + c]
{_gen(32, "a{o} += v * wf[wc + K{o}]", o=OB)}
                    yb = np.uint64((r * W + w0) * Cout + ob)
                    if relu:
{_gen(24, "yf[yb + K{o}] = zero if a{o} < zero else a{o}", o=OB)}
                    else:
{_gen(24, "yf[yb + K{o}] = a{o}", o=OB)}
                    w0 += 1
'''


def _direct_dw_source(CB, OB):
    """Source of _conv_dw_direct{CB}: dw += the weight gradient of image rows [r0, r1).

    x (N,H,W,Cin), dz (N,H,W,Cout); dw (k,k,Cin,Cout) accumulated in place:
        dw[i,j,c,o] += sum_{r0 <= n*H+h < r1, w} xpad[n, h+i-p, w+j-p, c] * dz[n,h,w,o].
    Register block: CB input channels x OB output channels of one tap (a{q}_{o}),
    summed over the chunk's pixels in order (h, w); per pixel one row dz[.., ob:ob+OB]
    (u{o}) times CB input values (v{q}). Cin a multiple of CB, Cout of OB."""
    return f'''
def _conv_dw_direct{CB}(x, dz, k, dw, r0, r1):
    N, H, W, Cin = x.shape
    Cout = dz.shape[3]
    p = k // 2
    xf = x.reshape(x.size)
    zf = dz.reshape(dz.size)
    dwf = dw.reshape(dw.size)
{_gen(4, "K{o} = np.uint64({o})", o=OB)}
{_gen(4, "Q{q} = np.uint64({q})", q=CB)}
{_gen(4, "R{q} = np.uint64({q} * Cout)", q=CB)}
    for i in range(k):
        for j in range(k):
            wlo = max(0, p - j)
            whi = min(W, W + p - j)
            for cb in range(0, Cin, {CB}):
                for ob in range(0, Cout, {OB}):
                    db = np.uint64(((i * k + j) * Cin + cb) * Cout + ob)
{_gen(20, "a{q}_{o} = dwf[db + R{q} + K{o}]", q=CB, o=OB)}
                    for r in range(r0, r1):
                        n = r // H
                        h = r - n * H
                        hs = h + i - p
                        if hs < 0 or hs >= H:
                            continue
                        xr = ((n * H + hs) * W + j - p) * Cin + cb
                        zr = r * W * Cout + ob
                        for w in range(wlo, whi):
                            xb = np.uint64(xr + w * Cin)
                            zb = np.uint64(zr + w * Cout)
{_gen(28, "u{o} = zf[zb + K{o}]", o=OB)}
{_gen(28, "v{q} = xf[xb + Q{q}]", q=CB)}
{_gen(28, "a{q}_{o} += v{q} * u{o}", q=CB, o=OB)}
{_gen(20, "dwf[db + R{q} + K{o}] = a{q}_{o}", q=CB, o=OB)}
'''


def _direct_kernels():
    """Compile the generated sources (with this file's name, so Numba's cache finds and dates them:
    the generator lives here, so the cache is stale exactly when this file changes)."""
    ns = {"np": np, "__name__": __name__}  # the module's name: Numba's cache re-imports it for the globals
    src = _direct_fwd_source(_DIRECT_PB, _DIRECT_OB)
    src += _direct_dw_source(4, _DIRECT_OB) + _direct_dw_source(1, _DIRECT_OB)
    exec(compile(src, __file__, "exec"), ns)
    jit = dict(cache=True, fastmath={"contract"}, nogil=True)
    return njit(**jit)(ns["_conv_direct"]), njit(**jit)(ns["_conv_dw_direct4"]), njit(**jit)(ns["_conv_dw_direct1"])


_conv_direct, _conv_dw_direct4, _conv_dw_direct1 = _direct_kernels()


def _compile_slp(kernel, *args):
    """Compile kernel for these arguments' types (or load it from the cache) with LLVM's SLP
    vectoriser switched on, before the pool's threads call it. Numba reads the switch when it
    builds each pass pipeline; the global compiler lock keeps other compilations from seeing it."""
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


def _use_direct(Cin, Cout, k):
    """The direct kernels: k > 1, Cout a multiple of 16, and (by the rule, unless forced) Cin, Cout <= 32."""
    if k == 1 or Cout % _DIRECT_OB:
        return False
    if _direct_force is not None:
        return _direct_force
    return Cin <= _DIRECT_MAX_C and Cout <= _DIRECT_MAX_C


# ---------------------------------------------------------------------------


def _flat_ranges(n):
    return _ranges(n, _ELEMS)


class NumbaBackend:
    """The fast CPU backend. Activations are NHWC (channels-last) between from_nchw and to_nchw."""

    name = "numba"
    xp = np

    def __init__(self, dtype="float32"):
        self.dtype = np.dtype(check_dtype(dtype))

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
    @staticmethod
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
                col = _tls_buffer((per * W, K), x.dtype)[: (r1 - r0) * W]
                _im2col(x, r0, r1, k, col)
                np.dot(col, wmat, out=yc)
            if b is not None:
                _bias_act(yc, b, relu)

        per = max(1, _COL_ELEMS // (W * K))
        _run(chunk, _ranges(N * H, per))

    @staticmethod
    def _conv_direct_rows(x, wt, b, relu, y):
        """y (N,H,W,Cout) = conv(x, wt) + b (then ReLU) with the direct kernel, chunk by chunk of image rows.

        x (N,H,W,Cin) NHWC; wt (k,k,Cin,Cout), wt[i,j,c,o] = w[o,c,i,j]; b (Cout,)."""
        N, H, W, Cin = x.shape
        relu = bool(relu)
        _compile_slp(_conv_direct, x, wt, b, relu, y, 0, 1)
        per = max(1, _ELEMS // (W * max(Cin, wt.shape[3])))
        _run(lambda r0, r1: _conv_direct(x, wt, b, relu, y, r0, r1), _ranges(N * H, per))

    @staticmethod
    def _conv_grads(x, dy2d, y2d, k, dz2d):
        """Per chunk of image rows: dz = dy * [y > 0] (or dy when y is None) into dz2d, the chunk's
        db (float64) and dw partial im2col(x)^T @ dz; the partials are added in chunk order.
        Returns (dwmat (k*k*Cin, Cout), db (Cout,) float64)."""
        N, H, W, Cin = x.shape
        Cout = dy2d.shape[1]
        K = k * k * Cin
        direct = _use_direct(Cin, Cout, k)
        if direct:  # about 2**18 values of x and dz rows per chunk (1 MB in float32; measured 16-32 rows best at W 256)
            per = max(1, _ELEMS // (W * (Cin + Cout)))
            dz4d = dz2d.reshape(N, H, W, Cout)
            dwk = _conv_dw_direct4 if Cin % 4 == 0 else _conv_dw_direct1
            _compile_slp(dwk, x, dz4d, k, np.zeros((k, k, Cin, Cout), x.dtype), 0, 1)
        else:
            per = max(1, _COL_ELEMS // (W * K))
        ranges = _ranges(N * H, per)

        def chunk(r0, r1):
            lo, hi = r0 * W, r1 * W
            db = np.empty(Cout, np.float64)
            if y2d is not None:
                _relu_mask_colsum(dy2d[lo:hi], y2d[lo:hi], dz2d[lo:hi], db)
            else:
                _colsum(dz2d[lo:hi], db)
            if direct:
                dw = np.zeros((k, k, Cin, Cout), x.dtype)
                dwk(x, dz4d, k, dw, r0, r1)
                return dw.reshape(K, Cout), db
            if k == 1:
                col = x.reshape(N * H * W, Cin)[lo:hi]
            else:
                col = _tls_buffer((per * W, K), x.dtype)[: hi - lo]
                _im2col(x, r0, r1, k, col)
            return col.T @ dz2d[lo:hi], db

        parts = _run(chunk, ranges)
        dwmat, db = parts[0][0].copy(), parts[0][1].copy()
        for dwp, dbp in parts[1:]:
            dwmat += dwp
            db += dbp
        return dwmat, db

    def conv2d_forward(self, x, w, b, relu=False):
        """y[n,h,w,o] = b[o] + sum_{i,j,c} xpad[n,h+i,w+j,c] * w[o,c,i,j], then max(y,0) if relu.

        x (N,H,W,Cin) NHWC, w (Cout,Cin,k,k), k odd, zero pad k//2 -> y (N,H,W,Cout).
        As a matrix product: Y (P,Cout) = col (P, k*k*Cin) @ Wmat, Wmat[(i,j,c), o] = w[o,c,i,j]."""
        x = np.ascontiguousarray(x)
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        y = np.empty((N, H, W, Cout), x.dtype)
        b = np.ascontiguousarray(b, dtype=x.dtype)
        if _use_direct(Cin, Cout, k):
            self._conv_direct_rows(x, np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=x.dtype), b, relu, y)
        else:
            wmat = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * Cin, Cout), dtype=x.dtype)
            self._conv_rows(x, wmat, k, b, relu, y.reshape(N * H * W, Cout))
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
        dy2d = np.ascontiguousarray(dy).reshape(P, Cout)
        if y is not None:
            dz2d = np.empty((P, Cout), x.dtype)
            dwmat, db = self._conv_grads(x, dy2d, y.reshape(P, Cout), k, dz2d)
        else:
            dz2d = dy2d
            dwmat, db = self._conv_grads(x, dy2d, None, k, dz2d)
        dw = np.ascontiguousarray(dwmat.reshape(k, k, Cin, Cout).transpose(3, 2, 0, 1)).astype(w.dtype, copy=False)
        dx = None
        if need_dx:
            # flipped kernel: wflip[(i,j,o), c] = w[o, c, k-1-i, k-1-j]
            wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1), x.dtype)  # (k,k,Cout,Cin)
            dx = np.empty((N, H, W, Cin), x.dtype)
            if _use_direct(Cout, Cin, k):
                self._conv_direct_rows(dz2d.reshape(N, H, W, Cout), wflip, np.zeros(Cin, x.dtype), False, dx)
            else:
                self._conv_rows(dz2d.reshape(N, H, W, Cout), wflip.reshape(k * k * Cout, Cin), k, None, False,
                                dx.reshape(P, Cin))
        return dx, dw, db.astype(w.dtype)

    # -- ReLU ----------------------------------------------------------------
    def relu_forward(self, x):
        """y = max(x, 0)."""
        xf = np.ascontiguousarray(x).reshape(-1)
        y = np.empty(x.shape, x.dtype)
        yf = y.reshape(-1)
        _run(lambda lo, hi: _relu_fwd(xf[lo:hi], yf[lo:hi]), _flat_ranges(xf.size))
        return y, ReluCache(y)

    def relu_backward(self, dy, cache):
        """dx = dy * [y > 0] (0 at the kink)."""
        dyf, yf = np.ascontiguousarray(dy).reshape(-1), cache.y.reshape(-1)
        dx = np.empty(cache.y.shape, dy.dtype)
        dxf = dx.reshape(-1)
        _run(lambda lo, hi: _relu_bwd(dyf[lo:hi], yf[lo:hi], dxf[lo:hi]), _flat_ranges(dyf.size))
        return dx

    # -- max-pool ------------------------------------------------------------
    def maxpool2x2_forward(self, x):
        """y = max of each 2x2 window; argmax = first maximum in row-major window order (ties -> lowest).

        x (N,H,W,C) NHWC -> y (N,H/2,W/2,C), cache.argmax (N,H/2,W/2,C) uint8."""
        x = np.ascontiguousarray(x)
        N, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
        y = np.empty((N, H // 2, W // 2, C), x.dtype)
        am = np.empty((N, H // 2, W // 2, C), np.uint8)
        _run(lambda r0, r1: _maxpool_fwd(x, y, am, r0, r1), _ranges(N * H // 2, _ELEMS // (2 * W * C)))
        return y, PoolCache(am, x.shape)

    def maxpool2x2_backward(self, dy, cache):
        """dx[n,2h+i,2w+j,c] = dy[n,h,w,c] if argmax[n,h,w,c] == 2i+j else 0."""
        N, H, W, C = cache.shape
        dy = np.ascontiguousarray(dy)
        dx = np.empty(cache.shape, dy.dtype)
        _run(lambda r0, r1: _maxpool_bwd(dy, cache.argmax, dx, r0, r1), _ranges(N * H, _ELEMS // (W * C)))
        return dx

    # -- up-conv ---------------------------------------------------------------
    @staticmethod
    def _upconv_wm(w, dtype):
        """Wm (Cin, 4*Cout), Wm[c, (i*2+j)*Cout + o] = w[c,o,i,j]."""
        Cin, Cout = w.shape[:2]
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout), dtype=dtype)

    def upconv2x2_forward(self, x, w, b):
        """y[n,2h+i,2w+j,o] = b[o] + sum_c x[n,h,w,c] * w[c,o,i,j].

        x (N,H,W,Cin) NHWC, w (Cin,Cout,2,2) -> y (N,2H,2W,Cout). Per chunk of
        rows: Z (rows*W, 4*Cout) = X @ Wm, then a scatter of the 2x2 blocks."""
        x = np.ascontiguousarray(x)
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        wm = self._upconv_wm(w, x.dtype)
        b = np.ascontiguousarray(b, dtype=x.dtype)
        x2d = x.reshape(N * H * W, Cin)
        y = np.empty((N, 2 * H, 2 * W, Cout), x.dtype)
        per = max(1, _ELEMS // (W * 4 * Cout))

        def chunk(r0, r1):
            z = _tls_buffer((per * W, 4 * Cout), x.dtype)[: (r1 - r0) * W]
            np.dot(x2d[r0 * W : r1 * W], wm, out=z)
            _upconv_scatter(z, b, y, r0)

        _run(chunk, _ranges(N * H, per))
        return y, UpConvCache(x, w)

    def upconv2x2_backward(self, dy, cache):
        """dZ[(n,h,w),(i,j,o)] = dy[n,2h+i,2w+j,o];  dx = dZ @ Wm^T;  dWm = X^T @ dZ;
        db[o] = sum_{n,y,x} dy[n,y,x,o]. dy (N,2H,2W,Cout) -> (dx (N,H,W,Cin), dw (Cin,Cout,2,2), db)."""
        x, w = cache
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        wmT = self._upconv_wm(w, x.dtype).T
        dy = np.ascontiguousarray(dy)
        x2d = x.reshape(N * H * W, Cin)
        dx = np.empty((N, H, W, Cin), x.dtype)
        dx2d = dx.reshape(N * H * W, Cin)
        per = max(1, _ELEMS // (W * 4 * Cout))

        def chunk(r0, r1):
            lo, hi = r0 * W, r1 * W
            dz = _tls_buffer((per * W, 4 * Cout), x.dtype)[: hi - lo]
            _upconv_gather(dy, dz, r0)
            np.dot(dz, wmT, out=dx2d[lo:hi])
            db = np.empty(4 * Cout, np.float64)
            _colsum(dz, db)
            return x2d[lo:hi].T @ dz, db

        parts = _run(chunk, _ranges(N * H, per))
        dwm, db4 = parts[0][0].copy(), parts[0][1].copy()
        for dwp, dbp in parts[1:]:
            dwm += dwp
            db4 += dbp
        dw = np.ascontiguousarray(dwm.reshape(Cin, 2, 2, Cout).transpose(0, 3, 1, 2)).astype(w.dtype, copy=False)
        db = db4.reshape(4, Cout).sum(axis=0)
        return dx, dw, db.astype(w.dtype)

    # -- skip connection -------------------------------------------------------
    def concat_channels(self, a, b):
        """(N,H,W,Ca), (N,H,W,Cb) -> (N,H,W,Ca+Cb), a's channels first."""
        N, H, W, Ca = a.shape
        Cb = b.shape[3]
        P = N * H * W
        a2, b2 = np.ascontiguousarray(a).reshape(P, Ca), np.ascontiguousarray(b).reshape(P, Cb)
        out = np.empty((N, H, W, Ca + Cb), a.dtype)
        o2 = out.reshape(P, Ca + Cb)
        _run(lambda lo, hi: _concat_last(a2[lo:hi], b2[lo:hi], o2[lo:hi]), _ranges(P, _ELEMS // (Ca + Cb)))
        return out

    def split_channels(self, d, ca):
        """(N,H,W,Ca+Cb) -> ((N,H,W,Ca), (N,H,W,Cb)), fresh arrays: the adjoint of concat."""
        N, H, W, C = d.shape
        P = N * H * W
        d2 = np.ascontiguousarray(d).reshape(P, C)
        a = np.empty((N, H, W, ca), d.dtype)
        b = np.empty((N, H, W, C - ca), d.dtype)
        a2, b2 = a.reshape(P, ca), b.reshape(P, C - ca)
        _run(lambda lo, hi: _split_last(d2[lo:hi], a2[lo:hi], b2[lo:hi]), _ranges(P, _ELEMS // C))
        return a, b

    # -- output and loss -----------------------------------------------------
    def sigmoid(self, z):
        """1 / (1 + exp(-z)), written so exp only sees -|z| (NCHW in and out)."""
        z = np.ascontiguousarray(z)
        s = np.empty_like(z)
        zf, sf = z.reshape(-1), s.reshape(-1)
        _run(lambda lo, hi: _sigmoid(zf[lo:hi], sf[lo:hi]), _flat_ranges(zf.size))
        return s

    def sigmoid_bce(self, z, y):
        """loss = mean(max(z,0) - z*y + log1p(exp(-|z|))); dz = (sigmoid(z) - y) / z.size. NCHW.

        The per-chunk sums (float64) are added in chunk order: deterministic."""
        z = np.ascontiguousarray(z)
        y = np.ascontiguousarray(y, dtype=z.dtype)
        dz = np.empty_like(z)
        zf, yf, dzf = z.reshape(-1), y.reshape(-1), dz.reshape(-1)
        size = z.dtype.type(z.size)
        parts = _run(lambda lo, hi: _sigmoid_bce(zf[lo:hi], yf[lo:hi], dzf[lo:hi], size), _flat_ranges(zf.size))
        total = 0.0
        for s in parts:
            total += s
        return float(total / z.size), dz

    # -- optimizer -----------------------------------------------------------
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), in place, in p's dtype."""
        T = p.dtype.type
        pf, mf, vf = p.reshape(-1), m.reshape(-1), v.reshape(-1)
        gf = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
        args = (T(lr), T(beta1), T(beta2), T(eps), T(1 - beta1**t), T(1 - beta2**t), T(1 - beta1), T(1 - beta2))
        _run(lambda lo, hi: _adam(pf[lo:hi], gf[lo:hi], mf[lo:hi], vf[lo:hi], *args), _flat_ranges(pf.size))
