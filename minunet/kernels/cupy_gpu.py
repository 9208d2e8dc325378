"""CuPy GPU backend (imported lazily; cupy is the optional ``gpu`` extra)."""

from __future__ import annotations


def cuda_available() -> bool:
    """True when cupy imports and at least one CUDA device answers."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU here"
        return False
