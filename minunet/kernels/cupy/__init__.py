"""CuPy GPU backend: hand-written CUDA kernels plus cuBLAS GEMMs (no cuDNN).

cupy is the optional ``gpu`` extra and is imported lazily: importing this package
never needs it, and ``CupyBackend()`` raises ``GpuUnavailableError`` (one line,
with the install hint) when cupy or a CUDA device is missing.

Read in this order: ``cuda.py`` (what a kernel is, the shared device helpers),
then one op family (``conv.py``, ``pool.py``, ``upconv.py``, ``elementwise.py``,
``adam.py``: each CUDA kernel sits directly above the method that launches it),
then ``backend.py`` (the families put together, the compile, the plumbing).
``device.py`` finds the GPU.

Layout. Activations are held channels-last, NHWC, between ``from_nchw`` and
``to_nchw``: every convolution is then ONE plain 2-D GEMM over all pixels of
the batch (conv.py), and the elementwise kernels read and write along the
channel axis, the fastest-varying one. Parameters stay in PyTorch layouts.

Determinism. Every kernel is a gather: each output element is written by
exactly one thread, which sums its own contributions in a fixed order (col2im,
max-pool backward, up-conv backward). There are no atomics. Reductions over
pixels (dw, db) are cuBLAS GEMMs, and the loss mean is cupy's fixed-order
reduction, so two runs on the same card give identical bits.

Precision. float32 (the default and the fast path) or float64: the kernels are
written for a type ``real`` and compiled once per dtype by NVRTC at run time
(``cupy.RawModule``, no nvcc needed); cuBLAS runs SGEMM or DGEMM. float64 is
for checks against the reference (it is slow on most GPUs). cuBLAS runs in
plain FP32 (CuPy enables TF32 only when CUPY_TF32=1 is set).

NaN and inf propagate as the interface says (``kernels/base.py``): the ReLU
keeps a NaN, its backward is a product, and a NaN wins the max-pool window.
"""

from minunet.kernels.cupy.backend import CupyBackend, cuda_source, kernels
from minunet.kernels.cupy.device import NO_CUPY, GpuUnavailableError, cuda_status

__all__ = ["CupyBackend", "GpuUnavailableError", "NO_CUPY", "cuda_source", "cuda_status", "kernels"]
