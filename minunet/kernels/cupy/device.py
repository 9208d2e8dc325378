"""Finding the GPU: import cupy lazily and say, in one line, why it cannot be used.

cupy is the optional ``gpu`` extra: nothing in this package imports it at
module level, so ``import minunet.kernels.cupy`` works on any machine.
"""

from __future__ import annotations

from minunet.errors import ConfigError

INSTALL_HINT = 'pip install "minunet[gpu]" (which installs cupy-cuda12x)'
NO_CUPY = "CuPy is not installed"


class GpuUnavailableError(ConfigError):
    """cupy is not installed, or no CUDA device answered.

    ``str()`` is one actionable line for the CLI; ``reason`` is the cause alone, in a
    few words, for notes such as "auto: no CUDA GPU (reason): using numba"."""

    def __init__(self, reason: str, remedy: str):
        super().__init__(f"the cupy backend cannot start: {reason}; {remedy}")
        self.reason = reason


def import_cupy():
    """Import cupy and check that a CUDA device answers; else raise GpuUnavailableError."""
    try:
        import cupy
    except ImportError as exc:
        reason = NO_CUPY if exc.name == "cupy" else f"CuPy does not import ({exc})"
        raise GpuUnavailableError(reason, f"{INSTALL_HINT}, or choose --backend numba") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # no driver, or a driver too old for this cupy
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GpuUnavailableError(
            f"no CUDA device answered ({first_line})",
            f"check the NVIDIA driver and that cupy matches your CUDA ({INSTALL_HINT}), or choose --backend numba",
        ) from None
    if count < 1:
        raise GpuUnavailableError("no CUDA device found", "choose --backend numba")
    return cupy


def cuda_status() -> tuple[bool, str]:
    """(True, "N CUDA device(s)") when cupy imports and a device answers, else (False, why not)."""
    try:
        cupy = import_cupy()
    except GpuUnavailableError as exc:
        return False, exc.reason
    return True, f"{cupy.cuda.runtime.getDeviceCount()} CUDA device(s)"
