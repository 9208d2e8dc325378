"""CuPy GPU backend: hand-written CUDA kernels plus cuBLAS GEMMs (no cuDNN).

cupy is the optional ``gpu`` extra and is imported lazily: importing this module
never needs it, and ``CupyBackend()`` raises ``GpuUnavailableError`` (one line,
with the install hint) when cupy or a CUDA device is missing.

Layout. Activations are held channels-last, NHWC, between ``from_nchw`` and
``to_nchw``. With NHWC every convolution is ONE plain 2-D GEMM over all pixels
of the batch: the im2col matrix has one row per pixel (n,h,w) and one column
per tap-and-channel (i,j,c), so

    forward     Y (M,Cout)  = COL (M,K) @ Wm^T (K,Cout)       M = N*H*W, K = k*k*Cin
    backward    dWm (Cout,K) = dZ^T (Cout,M) @ COL (M,K)
                dCOL (M,K)   = dZ (M,Cout) @ Wm (Cout,K)       then col2im
                db (Cout)    = 1 (M) @ dZ (M,Cout)

with Wm[o, (i*k+j)*Cin + c] = w[o,c,i,j]. The GEMMs are tall and thin (M is
N*H*W, up to 10^6), which cuBLAS handles well, and there is no per-sample
batching. The elementwise kernels read and write along the channel axis,
which is the fastest-varying one, so neighbouring threads touch neighbouring
addresses. Channel concat/split of the skip connection become interleaving
copies (one kernel each). Parameters stay in PyTorch layouts; the tiny weight
reshapes to and from Wm are done per call.

Determinism. Every kernel is a gather: each output element is written by
exactly one thread, which sums its own contributions in a fixed order (col2im,
max-pool backward, up-conv backward). There are no atomics. Reductions over
pixels (dw, db) are cuBLAS GEMMs, and the loss mean is cupy's fixed-order
reduction, so two runs on the same card give identical bits.

Memory. im2col is explicit; to bound its size the batch is processed in chunks
of whole samples whose column matrix fits in ``col_budget_bytes`` (default 2 GiB),
and dW is accumulated over the chunks in a fixed order.

Precision. float32 (the default and the fast path) or float64: the kernels are
written for a type ``real`` and compiled once per dtype; cuBLAS runs SGEMM or
DGEMM. float64 is for checks against the reference (it is slow on most GPUs).
cuBLAS runs in plain FP32 (CuPy enables TF32 only when CUPY_TF32=1 is set).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minunet.kernels.base import check_dtype

INSTALL_HINT = 'pip install "minunet[gpu]" (which installs cupy-cuda12x)'


class GpuUnavailableError(RuntimeError):
    """cupy is not installed, or no CUDA device answered. The message is one line for the CLI."""


def cuda_available() -> bool:
    """True when cupy imports and at least one CUDA device answers."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU here"
        return False


def _import_cupy():
    """Import cupy and check a device answers, or raise GpuUnavailableError (one line)."""
    try:
        import cupy
    except ImportError as exc:
        raise GpuUnavailableError(
            f"the cupy backend needs CuPy, which is not installed ({exc}): {INSTALL_HINT}, "
            "or choose --backend numba"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, or a driver too old for this cupy
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GpuUnavailableError(
            f"the cupy backend found no CUDA device ({msg}); check the NVIDIA driver, "
            f"or that cupy matches your CUDA ({INSTALL_HINT}), or choose --backend numba"
        ) from None
    if count < 1:
        raise GpuUnavailableError("the cupy backend found no CUDA device; choose --backend numba")
    return cupy


# ----------------------------------------------------------------------------
# CUDA source. One module, compiled once per process and dtype
# with NVRTC through cupy.RawModule. Every kernel is a 1-D grid-stride loop
# over its OUTPUT elements, with 64-bit flat indices; a thread writes only the
# element it owns (gather, no atomics). Shapes are NHWC unless noted.
# ----------------------------------------------------------------------------
CUDA_SOURCE = r"""
// `real` and the math macros EXP, FABS, LOG1P, SQRT come from the dtype prelude (REAL_PRELUDE).
#define GRID_LOOP(idx, total) \
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (long long)blockDim.x * gridDim.x)

// col (N*H*W, k*k*C): col[(n,h,w), (i*k+j)*C + c] = x[n, h+i-p, w+j-p, c], zero outside.
extern "C" __global__ void im2col_nhwc(const real* __restrict__ x, real* __restrict__ col,
                                       int N, int H, int W, int C, int k, int p) {
    const long long kk = (long long)k * k;
    const long long total = (long long)N * H * W * kk * C;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % C);
        long long r = idx / C;
        const int t = (int)(r % kk);
        r /= kk;
        const int w = (int)(r % W);
        r /= W;
        const int h = (int)(r % H);
        const long long n = r / H;
        const int hi = h + t / k - p;
        const int wi = w + t % k - p;
        real v = (real)0;
        if (hi >= 0 && hi < H && wi >= 0 && wi < W) v = x[((n * H + hi) * W + wi) * C + c];
        col[idx] = v;
    }
}

// The adjoint of im2col, as a gather: dx[n,h,w,c] = sum_{i,j} dcol[(n, h-i+p, w-j+p), (i*k+j)*C + c]
// over the taps whose source pixel lies inside the image. Fixed (i, j) order: deterministic.
extern "C" __global__ void col2im_nhwc(const real* __restrict__ dcol, real* __restrict__ dx,
                                       int N, int H, int W, int C, int k, int p) {
    const long long kk = (long long)k * k;
    const long long total = (long long)N * H * W * C;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % C);
        long long r = idx / C;
        const int w = (int)(r % W);
        r /= W;
        const int h = (int)(r % H);
        const long long n = r / H;
        real s = (real)0;
        for (int i = 0; i < k; ++i) {
            const int ho = h - i + p;
            if (ho < 0 || ho >= H) continue;
            for (int j = 0; j < k; ++j) {
                const int wo = w - j + p;
                if (wo < 0 || wo >= W) continue;
                s += dcol[(((n * H + ho) * W + wo) * kk + (i * k + j)) * C + c];
            }
        }
        dx[idx] = s;
    }
}

// y (M, C) in place: y += b[c]; then max(y, 0) when relu != 0.
extern "C" __global__ void bias_act(real* __restrict__ y, const real* __restrict__ b,
                                    long long total, int C, int relu) {
    GRID_LOOP(idx, total) {
        real v = y[idx] + b[idx % C];
        if (relu && !(v > (real)0)) v = (real)0;
        y[idx] = v;
    }
}

// y = max(x, 0)
extern "C" __global__ void relu_fwd(const real* __restrict__ x, real* __restrict__ y, long long total) {
    GRID_LOOP(idx, total) {
        const real v = x[idx];
        y[idx] = v > (real)0 ? v : (real)0;
    }
}

// dx = dy * [y > 0]   (y is the ReLU output; y > 0 exactly where its input > 0)
extern "C" __global__ void relu_bwd(const real* __restrict__ dy, const real* __restrict__ y,
                                    real* __restrict__ dx, long long total) {
    GRID_LOOP(idx, total) {
        dx[idx] = y[idx] > (real)0 ? dy[idx] : (real)0;
    }
}

// x (N,H,W,C) -> y (N,H/2,W/2,C), am (N,H/2,W/2,C) in 0..3 (row-major in the window:
// 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). First maximum wins (strict >).
extern "C" __global__ void maxpool_fwd(const real* __restrict__ x, real* __restrict__ y,
                                       unsigned char* __restrict__ am, int N, int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const long long total = (long long)N * Ho * Wo * C;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % C);
        long long r = idx / C;
        const int wo = (int)(r % Wo);
        r /= Wo;
        const int ho = (int)(r % Ho);
        const long long n = r / Ho;
        const real* p0 = x + ((n * H + 2 * ho) * W + 2 * wo) * C + c;  // top-left of the window
        const real v[4] = {p0[0], p0[C], p0[(long long)W * C], p0[(long long)W * C + C]};
        real best = v[0];
        unsigned char a = 0;
        for (unsigned char q = 1; q < 4; ++q) {
            if (v[q] > best) { best = v[q]; a = q; }
        }
        y[idx] = best;
        am[idx] = a;
    }
}

// Gather per input pixel: dx[n,h,w,c] = dy[n,h/2,w/2,c] if this pixel is its window's argmax, else 0.
extern "C" __global__ void maxpool_bwd(const real* __restrict__ dy, const unsigned char* __restrict__ am,
                                       real* __restrict__ dx, int N, int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const long long total = (long long)N * H * W * C;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % C);
        long long r = idx / C;
        const int w = (int)(r % W);
        r /= W;
        const int h = (int)(r % H);
        const long long n = r / H;
        const long long o = ((n * Ho + (h >> 1)) * Wo + (w >> 1)) * C + c;
        const unsigned char q = (unsigned char)(((h & 1) << 1) | (w & 1));
        dx[idx] = am[o] == q ? dy[o] : (real)0;
    }
}

// Up-conv forward, second half: T (N*H*W, 4*Co) holds sum_c x[n,h,w,c] * w[c,o,i,j] at column
// (i*2+j)*Co + o. y[n,2h+i,2w+j,o] = T[(n,h,w), (i*2+j)*Co + o] + b[o]   (y is N,2H,2W,Co).
extern "C" __global__ void upconv_expand(const real* __restrict__ T, const real* __restrict__ b,
                                         real* __restrict__ y, int N, int H, int W, int Co) {
    const int H2 = 2 * H, W2 = 2 * W;
    const long long total = (long long)N * H2 * W2 * Co;
    GRID_LOOP(idx, total) {
        const int o = (int)(idx % Co);
        long long r = idx / Co;
        const int X = (int)(r % W2);
        r /= W2;
        const int Y = (int)(r % H2);
        const long long n = r / H2;
        const int t = ((Y & 1) << 1) | (X & 1);
        y[idx] = T[((n * H + (Y >> 1)) * W + (X >> 1)) * (4LL * Co) + (long long)t * Co + o] + b[o];
    }
}

// The inverse permutation: dT[(n,h,w), (i*2+j)*Co + o] = dy[n, 2h+i, 2w+j, o].
extern "C" __global__ void upconv_collect(const real* __restrict__ dy, real* __restrict__ dT,
                                          int N, int H, int W, int Co) {
    const long long total = (long long)N * H * W * 4 * Co;
    GRID_LOOP(idx, total) {
        const int o = (int)(idx % Co);
        long long r = idx / Co;
        const int t = (int)(r % 4);
        r /= 4;
        const int w = (int)(r % W);
        r /= W;
        const int h = (int)(r % H);
        const long long n = r / H;
        dT[idx] = dy[((n * 2 * H + 2 * h + (t >> 1)) * (2LL * W) + 2 * w + (t & 1)) * Co + o];
    }
}

// out (P, Ca+Cb) = [a (P, Ca) | b (P, Cb)] per pixel (P = N*H*W): channels of a first.
extern "C" __global__ void concat_c(const real* __restrict__ a, const real* __restrict__ b,
                                    real* __restrict__ out, long long P, int Ca, int Cb) {
    const int Ct = Ca + Cb;
    const long long total = P * Ct;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % Ct);
        const long long pix = idx / Ct;
        out[idx] = c < Ca ? a[pix * Ca + c] : b[pix * Cb + (c - Ca)];
    }
}

// The adjoint: da (P, Ca) = d[:, :Ca], db (P, Cb) = d[:, Ca:]. One thread per element of d,
// each writes exactly one distinct element of da or db.
extern "C" __global__ void split_c(const real* __restrict__ d, real* __restrict__ da,
                                   real* __restrict__ db, long long P, int Ca, int Cb) {
    const int Ct = Ca + Cb;
    const long long total = P * Ct;
    GRID_LOOP(idx, total) {
        const int c = (int)(idx % Ct);
        const long long pix = idx / Ct;
        if (c < Ca) da[pix * Ca + c] = d[idx];
        else db[pix * Cb + (c - Ca)] = d[idx];
    }
}

// Stable sigmoid: exp of a non-positive number only.
extern "C" __global__ void sigmoid_k(const real* __restrict__ z, real* __restrict__ s, long long total) {
    GRID_LOOP(idx, total) {
        const real v = z[idx];
        const real e = EXP(-FABS(v));
        s[idx] = v >= (real)0 ? (real)1 / ((real)1 + e) : e / ((real)1 + e);
    }
}

// Fused sigmoid + BCE with logits, per element:
//   lp = max(z,0) - z*y + log1p(exp(-|z|))      dz = (sigmoid(z) - y) / n
extern "C" __global__ void sigmoid_bce_k(const real* __restrict__ z, const real* __restrict__ y,
                                         real* __restrict__ lp, real* __restrict__ dz,
                                         long long total, real n) {
    GRID_LOOP(idx, total) {
        const real v = z[idx], t = y[idx];
        const real e = EXP(-FABS(v));
        lp[idx] = (v > (real)0 ? v : (real)0) - v * t + LOG1P(e);
        const real s = v >= (real)0 ? (real)1 / ((real)1 + e) : e / ((real)1 + e);
        dz[idx] = (s - t) / n;
    }
}

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
"""

# Prepended to CUDA_SOURCE, one per dtype: the element type and its math functions.
REAL_PRELUDE = {
    "float32": "typedef float real;\n#define EXP expf\n#define FABS fabsf\n#define LOG1P log1pf\n#define SQRT sqrtf\n",
    "float64": "typedef double real;\n#define EXP exp\n#define FABS fabs\n#define LOG1P log1p\n#define SQRT sqrt\n",
}

KERNEL_NAMES = (
    "im2col_nhwc",
    "col2im_nhwc",
    "bias_act",
    "relu_fwd",
    "relu_bwd",
    "maxpool_fwd",
    "maxpool_bwd",
    "upconv_expand",
    "upconv_collect",
    "concat_c",
    "split_c",
    "sigmoid_k",
    "sigmoid_bce_k",
    "adam_k",
)

# The one compiled-kernel cache: dtype name -> {kernel name -> cupy.RawKernel}.
_KERNELS: dict[str, dict[str, Any]] = {}

_BLOCK = 256  # threads per block
_MAX_GRID = 1 << 16  # blocks; the grid-stride loops cover any size beyond


def _compiled_kernels(cupy, dtype_name: str) -> dict[str, Any]:
    """Compile REAL_PRELUDE[dtype] + CUDA_SOURCE once per dtype (NVRTC, via cupy.RawModule) and fetch every kernel."""
    if dtype_name not in _KERNELS:
        module = cupy.RawModule(code=REAL_PRELUDE[dtype_name] + CUDA_SOURCE)
        _KERNELS[dtype_name] = {name: module.get_function(name) for name in KERNEL_NAMES}
    return _KERNELS[dtype_name]


# ----------------------------------------------------------------------------
# caches (NHWC activations)
# ----------------------------------------------------------------------------
class ConvCache(NamedTuple):
    x: Any  # (N,H,W,Cin) the input
    w: Any  # (Cout,Cin,k,k)
    y: Any  # (N,H,W,Cout) the output after ReLU when fused, else None


class ReluCache(NamedTuple):
    y: Any  # the output; x > 0 exactly where y > 0


class PoolCache(NamedTuple):
    argmax: Any  # (N,H/2,W/2,C) uint8 in 0..3: row-major index in the 2x2 window
    shape: tuple  # (N,H,W,C) of the input


class UpConvCache(NamedTuple):
    x: Any  # (N,H,W,Cin)
    w: Any  # (Cin,Cout,2,2)


class CupyBackend:
    """The U-Net ops on an NVIDIA GPU. See the module docstring for layout and determinism.

    Construct through ``get_backend("cupy")``. Raises GpuUnavailableError when
    cupy or a device is missing, ValueError for a dtype other than float32/float64.
    """

    name = "cupy"

    def __init__(self, dtype="float32", col_budget_bytes: int = 2 << 30):
        self.dtype = np.dtype(check_dtype(dtype))
        self.col_budget_bytes = int(col_budget_bytes)
        self._setup()
        self._ones = None  # cached vector of ones for db = 1^T dZ
        self._copy_stream = None  # upload_async: created on first use
        self._ring: list = []  # upload_async: slots of pinned + device buffers and their events
        self._ring_next = 0
        self._last_slot = None

    def _setup(self):
        """Import cupy (or raise GpuUnavailableError); compile the kernels on first use."""
        cupy = _import_cupy()
        self.xp = cupy
        self._kernels = None

    # -- plumbing --------------------------------------------------------------
    def _launch(self, name: str, total: int, *args):
        """Run kernel ``name`` over ``total`` output elements (a grid-stride loop).

        Array arguments must be contiguous device arrays; scalars must already be
        numpy scalars of the C type the kernel declares (np.int32 for int,
        np.int64 for long long, self.dtype.type for real)."""
        if total <= 0:
            return
        if self._kernels is None:
            self._kernels = _compiled_kernels(self.xp, self.dtype.name)
        grid = min((total + _BLOCK - 1) // _BLOCK, _MAX_GRID)
        self._kernels[name]((grid,), (_BLOCK,), args)

    def _c(self, a):
        """A C-contiguous array of this backend's dtype on the device (no copy when it already is)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=self.dtype))

    def _ones_vec(self, m: int):
        if self._ones is None or self._ones.shape[0] < m:
            self._ones = self.xp.ones(m, dtype=self.dtype)
        return self._ones[:m]

    def _samples_per_chunk(self, N: int, H: int, W: int, K: int) -> int:
        per_sample = H * W * K * self.dtype.itemsize
        return int(max(1, min(N, self.col_budget_bytes // max(per_sample, 1))))

    def _im2col(self, x, n0, n1, k, out):
        """x (N,H,W,C) samples n0..n1 -> out ((n1-n0)*H*W, k*k*C)."""
        _, H, W, C = x.shape
        xs = x[n0:n1]  # contiguous: a slice of whole samples
        i32 = np.int32
        self._launch("im2col_nhwc", out.size, xs, out, i32(n1 - n0), i32(H), i32(W), i32(C), i32(k), i32(k // 2))
        return out

    # -- layout --------------------------------------------------------------
    def from_nchw(self, x):
        """(N,C,H,W) host or device array -> (N,H,W,C) device array."""
        xp = self.xp
        return xp.ascontiguousarray(xp.asarray(x, dtype=self.dtype).transpose(0, 2, 3, 1))

    def to_nchw(self, a):
        """(N,H,W,C) -> (N,C,H,W) device array."""
        return self.xp.ascontiguousarray(a.transpose(0, 3, 1, 2))

    def asarray(self, a, dtype=None):
        """Host (or device) array -> device array (cupy.asarray uploads)."""
        return self.xp.asarray(a, dtype=dtype or self.dtype)

    def to_host(self, a):
        """Device array -> numpy array (a download; synchronises)."""
        return a.get() if hasattr(a, "get") else np.asarray(a)

    # -- convolution ---------------------------------------------------------
    def conv2d_forward(self, x, w, b, relu=False):
        """y[n,h,w,o] = b[o] + sum_{i,j,c} w[o,c,i,j] * xpad[n,h+i,w+j,c], then max(y,0) if relu.

        x (N,H,W,Cin), w (Cout,Cin,k,k) with k odd, zero padding k//2, stride 1 -> y (N,H,W,Cout).
        As a GEMM: Y (N*H*W, Cout) = COL (N*H*W, k*k*Cin) @ Wm^T, Wm[o,(i*k+j)*Cin+c] = w[o,c,i,j].
        A 1x1 conv needs no im2col: COL is x itself.
        """
        xp = self.xp
        x, w, b = self._c(x), self._c(w), self._c(b)
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        K = k * k * Cin
        wmt = xp.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(K, Cout))  # (K,Cout) = Wm^T
        y = xp.empty((N, H, W, Cout), dtype=self.dtype)
        y2 = y.reshape(N * H * W, Cout)
        if k == 1:
            xp.matmul(x.reshape(N * H * W, Cin), wmt, out=y2)
        else:
            S = self._samples_per_chunk(N, H, W, K)
            col = xp.empty((S * H * W, K), dtype=self.dtype)
            for n0 in range(0, N, S):
                n1 = min(N, n0 + S)
                rows = (n1 - n0) * H * W
                self._im2col(x, n0, n1, k, col[:rows])
                xp.matmul(col[:rows], wmt, out=y2[n0 * H * W : n1 * H * W])
        self._launch("bias_act", y.size, y, b, np.int64(y.size), np.int32(Cout), np.int32(1 if relu else 0))
        return y, ConvCache(x, w, y if relu else None)

    def conv2d_backward(self, dy, cache, need_dx=True):
        """Gradients of conv2d_forward, dy (N,H,W,Cout) -> (dx (N,H,W,Cin) or None, dw, db).

        With ReLU fused, first dz = dy * [y > 0]. Then, with M = N*H*W rows:
            db (Cout)     = 1 (M) @ dZ (M,Cout)                 = sum_{n,h,w} dz[n,h,w,o]
            dWm (Cout,K)  = dZ^T @ COL                          -> dw[o,c,i,j] = dWm[o,(i*k+j)*Cin+c]
            dCOL (M,K)    = dZ @ Wm, then dx = col2im(dCOL)      (a gather over the k*k taps)
        COL is rebuilt chunk by chunk (not kept from the forward), and dWm is summed
        over the chunks in order.
        """
        xp = self.xp
        x, w, y = cache
        N, H, W, Cin = x.shape
        Cout, _, k, _ = w.shape
        K = k * k * Cin
        M = N * H * W
        dy = self._c(dy)
        if y is not None:
            dz = xp.empty_like(dy)
            self._launch("relu_bwd", dz.size, dy, y, dz, np.int64(dz.size))
        else:
            dz = dy
        dz2 = dz.reshape(M, Cout)
        db = xp.matmul(self._ones_vec(M), dz2)  # (Cout,)
        wm = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cout, K))  # (Cout,K)
        dx = xp.empty((N, H, W, Cin), dtype=self.dtype) if need_dx else None
        if k == 1:
            x2 = x.reshape(M, Cin)
            dwm = xp.matmul(dz2.T, x2)
            if need_dx:
                xp.matmul(dz2, wm, out=dx.reshape(M, Cin))
        else:
            S = self._samples_per_chunk(N, H, W, K)
            col = xp.empty((S * H * W, K), dtype=self.dtype)
            dwm = None
            i32 = np.int32
            for n0 in range(0, N, S):
                n1 = min(N, n0 + S)
                rows = (n1 - n0) * H * W
                r0, r1 = n0 * H * W, n1 * H * W
                colc = self._im2col(x, n0, n1, k, col[:rows])
                part = xp.matmul(dz2[r0:r1].T, colc)  # (Cout,K)
                dwm = part if dwm is None else dwm + part
                if need_dx:
                    xp.matmul(dz2[r0:r1], wm, out=colc)  # dCOL reuses the COL buffer
                    self._launch(
                        "col2im_nhwc", rows * Cin, colc, dx[n0:n1],
                        i32(n1 - n0), i32(H), i32(W), i32(Cin), i32(k), i32(k // 2),
                    )
        dw = xp.ascontiguousarray(dwm.reshape(Cout, k, k, Cin).transpose(0, 3, 1, 2))
        return dx, dw, db

    # -- ReLU ----------------------------------------------------------------
    def relu_forward(self, x):
        """y = max(x, 0) -> (y, cache)."""
        x = self._c(x)
        y = self.xp.empty_like(x)
        self._launch("relu_fwd", x.size, x, y, np.int64(x.size))
        return y, ReluCache(y)

    def relu_backward(self, dy, cache):
        """dx = dy * [y > 0] (0 at the kink)."""
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self._launch("relu_bwd", dx.size, dy, cache.y, dx, np.int64(dx.size))
        return dx

    # -- max-pool ------------------------------------------------------------
    def maxpool2x2_forward(self, x):
        """x (N,H,W,C) -> y (N,H/2,W/2,C) = max of each 2x2 window; argmax 0..3 = the
        first maximum in row-major window order (ties -> lowest index), as the reference."""
        x = self._c(x)
        N, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"max-pool needs even H and W, got {H}x{W}")
        y = self.xp.empty((N, H // 2, W // 2, C), dtype=self.dtype)
        am = self.xp.empty((N, H // 2, W // 2, C), dtype=np.uint8)
        i32 = np.int32
        self._launch("maxpool_fwd", y.size, x, y, am, i32(N), i32(H), i32(W), i32(C))
        return y, PoolCache(am, x.shape)

    def maxpool2x2_backward(self, dy, cache):
        """dy (N,H/2,W/2,C) -> dx (N,H,W,C): zero except at each window's argmax, which gets dy.
        Computed per input pixel (a gather), so there is no scatter and no atomics."""
        dy = self._c(dy)
        N, H, W, C = cache.shape
        dx = self.xp.empty((N, H, W, C), dtype=self.dtype)
        i32 = np.int32
        self._launch("maxpool_bwd", dx.size, dy, cache.argmax, dx, i32(N), i32(H), i32(W), i32(C))
        return dx

    # -- up-conv ---------------------------------------------------------------
    def upconv2x2_forward(self, x, w, b):
        """y[n,2h+i,2w+j,o] = b[o] + sum_c x[n,h,w,c] * w[c,o,i,j].

        x (N,H,W,Cin), w (Cin,Cout,2,2) -> y (N,2H,2W,Cout). The 2x2 output blocks do
        not overlap, so this is one GEMM, T (N*H*W, 4*Cout) = X (N*H*W, Cin) @ Wr with
        Wr[c,(i*2+j)*Cout+o] = w[c,o,i,j], then a gather that places each T column in its block.
        """
        xp = self.xp
        x, w, b = self._c(x), self._c(w), self._c(b)
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        wr = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout))
        t = xp.matmul(x.reshape(N * H * W, Cin), wr)  # (NHW, 4*Cout)
        y = xp.empty((N, 2 * H, 2 * W, Cout), dtype=self.dtype)
        i32 = np.int32
        self._launch("upconv_expand", y.size, t, b, y, i32(N), i32(H), i32(W), i32(Cout))
        return y, UpConvCache(x, w)

    def upconv2x2_backward(self, dy, cache):
        """dy (N,2H,2W,Cout) -> (dx (N,H,W,Cin), dw (Cin,Cout,2,2), db (Cout)).

            dT[(n,h,w),(i*2+j)*Cout+o] = dy[n,2h+i,2w+j,o]       (a gather: the inverse permutation)
            dx (NHW,Cin)   = dT @ Wr^T    = sum_{o,i,j} dy[n,2h+i,2w+j,o] * w[c,o,i,j]
            dWr (Cin,4Cout) = X^T @ dT    -> dw[c,o,i,j] = sum_{n,h,w} x[n,h,w,c] * dy[n,2h+i,2w+j,o]
            db (Cout)      = 1 @ dy (N*2H*2W, Cout)
        """
        xp = self.xp
        x, w = cache
        dy = self._c(dy)
        N, H, W, Cin = x.shape
        Cout = w.shape[1]
        M = N * H * W
        dt = xp.empty((M, 4 * Cout), dtype=self.dtype)
        i32 = np.int32
        self._launch("upconv_collect", dt.size, dy, dt, i32(N), i32(H), i32(W), i32(Cout))
        wr = xp.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(Cin, 4 * Cout))
        dx = xp.matmul(dt, wr.T).reshape(N, H, W, Cin)
        dwr = xp.matmul(x.reshape(M, Cin).T, dt)  # (Cin, 4*Cout)
        dw = xp.ascontiguousarray(dwr.reshape(Cin, 2, 2, Cout).transpose(0, 3, 1, 2))
        db = xp.matmul(self._ones_vec(4 * M), dy.reshape(4 * M, Cout))
        return dx, dw, db

    # -- skip connection -------------------------------------------------------
    def concat_channels(self, a, b):
        """a (N,H,W,Ca), b (N,H,W,Cb) -> (N,H,W,Ca+Cb), a's channels first."""
        a, b = self._c(a), self._c(b)
        N, H, W, Ca = a.shape
        Cb = b.shape[3]
        out = self.xp.empty((N, H, W, Ca + Cb), dtype=self.dtype)
        self._launch("concat_c", out.size, a, b, out, np.int64(N * H * W), np.int32(Ca), np.int32(Cb))
        return out

    def split_channels(self, d, ca):
        """d (N,H,W,Ca+Cb) -> (d[..., :ca], d[..., ca:]) as fresh arrays: the adjoint of concat."""
        d = self._c(d)
        N, H, W, Ct = d.shape
        ca = int(ca)
        cb = Ct - ca
        da = self.xp.empty((N, H, W, ca), dtype=self.dtype)
        db = self.xp.empty((N, H, W, cb), dtype=self.dtype)
        self._launch("split_c", d.size, d, da, db, np.int64(N * H * W), np.int32(ca), np.int32(cb))
        return da, db

    # -- output and loss -----------------------------------------------------
    def sigmoid(self, z):
        """Elementwise 1 / (1 + exp(-z)), stable for any z (any layout in, same out)."""
        z = self._c(z)
        s = self.xp.empty_like(z)
        self._launch("sigmoid_k", z.size, z, s, np.int64(z.size))
        return s

    def sigmoid_bce_device(self, z, y):
        """As ``sigmoid_bce`` but the loss stays on the device as a 0-d float64 array.

        No host synchronisation: a training loop can keep it and call float() on it
        only when it logs."""
        z = self._c(z)
        y = self._c(y)
        if y.shape != z.shape:
            raise ValueError(f"targets have shape {tuple(y.shape)}, logits {tuple(z.shape)}")
        lp = self.xp.empty_like(z)
        dz = self.xp.empty_like(z)
        self._launch("sigmoid_bce_k", z.size, z, y, lp, dz, np.int64(z.size), self.dtype.type(z.size))
        loss = lp.sum(dtype=np.float64) / z.size
        return loss, dz

    def sigmoid_bce(self, z, y):
        """loss = mean(max(z,0) - z*y + log1p(exp(-|z|))); dz = (sigmoid(z) - y) / z.size.

        Returns (loss as a Python float, dz). The float() waits for the GPU; see
        ``sigmoid_bce_device`` for the variant that does not."""
        loss, dz = self.sigmoid_bce_device(z, y)
        return float(loss), dz

    # -- optimizer -----------------------------------------------------------
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).  In place on p, m, v (contiguous)."""
        for name, a in (("p", p), ("m", m), ("v", v)):
            if not a.flags.c_contiguous or a.dtype != self.dtype:
                raise ValueError(f"adam_step needs {name} as a contiguous {self.dtype.name} array")
        g = self._c(g)
        r = self.dtype.type  # the kernel's `real`
        self._launch(
            "adam_k", p.size, p, g, m, v, np.int64(p.size),
            r(lr), r(beta1), r(1 - beta1), r(beta2), r(1 - beta2),
            r(eps), r(1 - beta1**t), r(1 - beta2**t),
        )

    # -- input pipeline (not part of the Backend protocol) ---------------------
    def upload_async(self, *arrays, slots: int = 2):
        """Queue the upload of one batch (host arrays, e.g. images and masks) and return
        device arrays at once, without waiting: ``xb, yb = be.upload_async(x, y)``.

        Each array goes host -> pinned host buffer (a CPU memcpy) -> device buffer on a
        separate non-blocking stream, so the copy overlaps the kernels already queued on
        the current stream; the current stream then waits, on the GPU and not the host,
        for the copy before any later kernel reads the arrays.

        The device and pinned buffers are a ring of ``slots`` batches reused in turn.
        Contract: call it for batch k+1 after queueing the step that reads batch k; a
        returned array stays valid until ``slots`` more calls. Before a slot is
        overwritten, its copy waits (GPU side) for an event recorded on the current
        stream at the following call, i.e. for the step that read it. With slots=2 the
        copy of batch k+2 thus waits for step k and overlaps step k+1.
        """
        cupy = self.xp
        import cupyx

        hosts = [np.ascontiguousarray(a, dtype=self.dtype) for a in arrays]
        current = cupy.cuda.get_current_stream()
        if self._copy_stream is None:
            self._copy_stream = cupy.cuda.Stream(non_blocking=True)
        if self._last_slot is not None:
            # everything queued so far includes the step that read the last batch
            consumed = cupy.cuda.Event(disable_timing=True)
            consumed.record(current)
            self._last_slot["consumed"] = consumed
        while len(self._ring) < slots:
            self._ring.append({"pinned": [], "dev": [], "copied": None, "consumed": None})
        slot = self._ring[self._ring_next % len(self._ring)]
        self._ring_next += 1
        if slot["copied"] is not None:
            slot["copied"].synchronize()  # host wait: the pinned buffers are free to overwrite
        shapes = [h.shape for h in hosts]
        if [p.shape for p in slot["pinned"]] != shapes:
            # allocated on the current stream, so the pool reuses freed buffers in stream order
            slot["pinned"] = [cupyx.empty_pinned(s, dtype=self.dtype) for s in shapes]
            slot["dev"] = [cupy.empty(s, dtype=self.dtype) for s in shapes]
        for pinned, host in zip(slot["pinned"], hosts, strict=True):
            np.copyto(pinned, host)
        if slot["consumed"] is not None:
            self._copy_stream.wait_event(slot["consumed"])  # the step that read this slot is done
        for dev, pinned in zip(slot["dev"], slot["pinned"], strict=True):
            dev.set(pinned, stream=self._copy_stream)
        copied = cupy.cuda.Event(disable_timing=True)
        copied.record(self._copy_stream)
        current.wait_event(copied)
        slot["copied"], slot["consumed"] = copied, None
        self._last_slot = slot
        return tuple(slot["dev"]) if len(slot["dev"]) != 1 else slot["dev"][0]

    def synchronize(self):
        """Wait for all queued GPU work (for timing, or before reading results on the host)."""
        self.xp.cuda.get_current_stream().synchronize()
