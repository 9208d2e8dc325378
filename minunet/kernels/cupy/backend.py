"""``CupyBackend``: the op families put together, the one compiled CUDA module, and the host plumbing.

The ops live in their families (conv.py, pool.py, upconv.py, elementwise.py,
adam.py), each CUDA kernel directly above the method that launches it. Here:
``cuda_source`` joins all kernels into one source per dtype, ``_launch`` runs a
kernel from the module NVRTC compiled once per process and dtype, and the
methods every family relies on (layout, uploads, the device queue).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minunet.kernels.base import Backend, check_dtype
from minunet.kernels.cupy.adam import AdamOps
from minunet.kernels.cupy.conv import ConvOps
from minunet.kernels.cupy.cuda import DEVICE_HELPERS, REAL_PRELUDE, CudaKernel
from minunet.kernels.cupy.device import import_cupy
from minunet.kernels.cupy.elementwise import ElementwiseOps
from minunet.kernels.cupy.pool import PoolOps
from minunet.kernels.cupy.upconv import UpConvOps

OP_FAMILIES = (ConvOps, ElementwiseOps, PoolOps, UpConvOps, AdamOps)


def kernels() -> tuple[CudaKernel, ...]:
    """Every CUDA kernel of the backend: the ``CudaKernel`` attributes of each op family, in source order."""
    return tuple(v for fam in OP_FAMILIES for v in vars(fam).values() if isinstance(v, CudaKernel))


def cuda_source(dtype: str) -> str:
    """The whole CUDA source for ``dtype`` (float32 or float64): what NVRTC compiles, and the emulation test."""
    return REAL_PRELUDE[check_dtype(dtype)] + DEVICE_HELPERS + "".join(k.source for k in kernels())


# The one compiled-kernel cache: dtype name -> {kernel name -> cupy.RawKernel}.
_COMPILED: dict[str, dict[str, Any]] = {}

_BLOCK = 256  # threads per block
_MAX_GRID = 1 << 16  # blocks; the grid-stride loops cover any size beyond


def _compiled_kernels(cupy, dtype_name: str) -> dict[str, Any]:
    """Compile ``cuda_source(dtype)`` once per dtype (NVRTC, via cupy.RawModule) and fetch every kernel."""
    if dtype_name not in _COMPILED:
        module = cupy.RawModule(code=cuda_source(dtype_name))
        _COMPILED[dtype_name] = {k.name: module.get_function(k.name) for k in kernels()}
    return _COMPILED[dtype_name]


class CupyBackend(ConvOps, ElementwiseOps, PoolOps, UpConvOps, AdamOps, Backend):
    """The U-Net ops on an NVIDIA GPU. See the package docstring for layout and determinism.

    Construct through ``open_backend("cupy")``. Raises GpuUnavailableError when
    cupy or a device is missing, ValueError for a dtype other than float32/float64.
    """

    name = "cupy"
    asynchronous = True  # kernels and copies are queued on the current stream; float() of a result waits

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
        self.xp = import_cupy()
        self._kernels = None

    # -- plumbing --------------------------------------------------------------
    def _launch(self, kernel: CudaKernel, total: int, *args):
        """Run ``kernel`` over ``total`` output elements (a grid-stride loop).

        Array arguments must be contiguous device arrays; scalars must already be
        numpy scalars of the C type the kernel declares (np.int32 for int,
        np.int64 for long long, self.dtype.type for real)."""
        if total <= 0:
            return
        if self._kernels is None:
            self._kernels = _compiled_kernels(self.xp, self.dtype.name)
        grid = min((total + _BLOCK - 1) // _BLOCK, _MAX_GRID)
        self._kernels[kernel.name]((grid,), (_BLOCK,), args)

    def _c(self, a):
        """A C-contiguous array of this backend's dtype on the device (no copy when it already is)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=self.dtype))

    def _ones_vec(self, m: int):
        if self._ones is None or self._ones.shape[0] < m:
            self._ones = self.xp.ones(m, dtype=self.dtype)
        return self._ones[:m]

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

    # -- device queue and input pipeline (optional interface methods) ----------
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
