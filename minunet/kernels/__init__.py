"""Backends: the interface (base), the NumPy reference, Numba CPU and CuPy GPU."""

from minunet.kernels.base import get_backend

__all__ = ["get_backend"]
