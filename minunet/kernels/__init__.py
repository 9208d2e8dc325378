"""Backends: the interface (``base``), the NumPy reference, Numba CPU and CuPy GPU.

``open_backend`` is the one way in: it picks and starts a backend, and turns
every reason a backend cannot start into a one-line ``ConfigError`` saying
what to do. The backends are imported only when asked for, so numba and cupy
stay optional at import time.
"""

from __future__ import annotations

from minunet.errors import ConfigError
from minunet.kernels.base import Backend, check_dtype

NAMES = ("auto", "numpy", "numba", "cupy")


def open_backend(name: str = "auto", dtype: str = "float32") -> tuple[Backend, str | None]:
    """Start the backend ``name`` (auto, numpy, numba or cupy) in ``dtype``: (backend, note).

    ``auto`` picks cupy when a CUDA device answers, else numba, else numpy; the note
    (None when there is nothing to say) says why it fell back: that cupy is installed but
    cannot start, or that numba is missing (no note where cupy is simply not installed). Raises ConfigError with
    one actionable line for an unknown name, an unsupported dtype, numba missing, and
    cupy or a CUDA device missing (``GpuUnavailableError``, a ConfigError).
    """
    key = (name or "auto").lower()
    if key not in NAMES:
        raise ConfigError(f"unknown backend {name!r}: choose {', '.join(NAMES)}")
    try:
        dtype = check_dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend {key}: {exc}") from None
    if key == "numpy":
        from minunet.kernels.numpy_ref import NumpyBackend

        return NumpyBackend(dtype), None
    if key == "cupy":
        from minunet.kernels.cupy import CupyBackend

        return CupyBackend(dtype), None  # GpuUnavailableError says what to install
    note = None
    if key == "auto":
        from minunet.kernels.cupy import NO_CUPY, CupyBackend, cuda_status

        has_gpu, why = cuda_status()
        if has_gpu:
            return CupyBackend(dtype), None
        if why != NO_CUPY:  # a CPU install (no gpu extra) needs no note on every run
            note = f"no CUDA GPU ({why}): using numba"
    try:
        from minunet.kernels.numba import NumbaBackend
    except ImportError as exc:
        if key == "auto":
            from minunet.kernels.numpy_ref import NumpyBackend

            note = "; ".join(n for n in (note, f"numba is not available ({exc}): using numpy") if n)
            return NumpyBackend(dtype), note
        raise ConfigError(
            f"the numba backend is not available ({exc}): pip install numba, or choose --backend numpy"
        ) from None
    return NumbaBackend(dtype), note


def get_backend(name: str = "auto", dtype: str = "float32") -> Backend:
    """``open_backend(name, dtype)`` without the note: the backend alone."""
    return open_backend(name, dtype)[0]


__all__ = ["Backend", "open_backend", "get_backend"]
