"""What every CUDA kernel of the cupy backend shares: its type, the element type, the device helpers.

Each op family (conv.py, pool.py, upconv.py, elementwise.py, adam.py) writes its
kernels as ``CudaKernel`` class attributes, each directly above the method that
launches it. ``backend.cuda_source(dtype)`` puts them after ``REAL_PRELUDE`` and
``DEVICE_HELPERS`` into ONE source, which NVRTC compiles once per process and
dtype (through cupy.RawModule), and which the CPU emulation test compiles with
g++. Print it with ``python -c "from minunet.kernels.cupy import cuda_source;
print(cuda_source('float32'))"``.

Every kernel is a 1-D grid-stride loop over its OUTPUT elements, with 64-bit
flat indices; a thread writes only the element it owns (a gather, no atomics).
Shapes are NHWC unless noted.
"""

from __future__ import annotations

from typing import NamedTuple


class CudaKernel(NamedTuple):
    """One ``extern "C" __global__`` function: launched by ``name``, defined in ``source``."""

    name: str
    source: str


# The element type `real` and its math functions, one prelude per dtype.
REAL_PRELUDE = {
    "float32": "typedef float real;\n#define EXP expf\n#define FABS fabsf\n#define LOG1P log1pf\n#define SQRT sqrtf\n",
    "float64": "typedef double real;\n#define EXP exp\n#define FABS fabs\n#define LOG1P log1p\n#define SQRT sqrt\n",
}

DEVICE_HELPERS = r"""
// `real` and the math macros EXP, FABS, LOG1P, SQRT come from the dtype prelude (REAL_PRELUDE).

// Every kernel: for (idx over this thread's share of 0..total-1), a grid-stride loop.
#define GRID_LOOP(idx, total) \
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (long long)blockDim.x * gridDim.x)

// An element (n, h, w, c) of an NHWC tensor of shape (N, H, W, C); flat index ((n*H + h)*W + w)*C + c.
struct Nhwc {
    long long n;
    int h, w, c;
};

__device__ inline Nhwc nhwc_unflatten(long long idx, int H, int W, int C) {
    Nhwc e;
    e.c = (int)(idx % C);
    long long r = idx / C;
    e.w = (int)(r % W);
    r /= W;
    e.h = (int)(r % H);
    e.n = r / H;
    return e;
}

__device__ inline long long nhwc_flat(long long n, int h, int w, int c, int H, int W, int C) {
    return ((n * H + h) * W + w) * (long long)C + c;
}

// True only for NaN (IEEE: NaN != NaN); holds because RawModule does not pass --use_fast_math.
__device__ inline bool is_nan(real v) { return v != v; }

// max(v, 0) that keeps a NaN: the NaN rule of the backend interface (kernels/base.py).
__device__ inline real relu_keep_nan(real v) { return (v > (real)0 || is_nan(v)) ? v : (real)0; }
"""
