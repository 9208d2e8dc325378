"""The backend interface: the ops every backend implements, documented once.

A backend is an object with a ``name``, an array module ``xp`` (numpy or cupy)
and the ops below. Layers call only these ops and ``xp``; they never import
numba or cupy. Parameters always live in PyTorch layouts:

    Conv2d            weight (Cout, Cin, k, k), bias (Cout,)
    ConvTranspose2d   weight (Cin, Cout, 2, 2), bias (Cout,)

Activations: the model hands NCHW arrays to ``from_nchw`` and gets NCHW arrays
back from ``to_nchw``. Between those two calls a backend may hold activations
in whatever layout it computes fastest in (the reference keeps NCHW; a fast
CPU backend may keep NHWC). Every op below takes and returns activations in
the backend's own layout; the shapes written here are the logical NCHW ones.

Conventions (after cs231n and llm.c):
- ``*_forward`` returns ``(out, cache)``; the cache is a small NamedTuple the
  matching ``*_backward`` consumes. Ops keep no hidden state.
- ``*_backward`` returns fresh gradients; the layer adds them into its zeroed
  gradient buffers, so a tensor used twice (the skip connection) receives the
  sum of both gradients by construction.
"""

from __future__ import annotations

from typing import Any, Protocol


class Backend(Protocol):
    """What a backend provides. See ``numpy_ref.NumpyBackend`` for the spec."""

    name: str
    xp: Any  # the array module: numpy or cupy

    # -- layout --------------------------------------------------------------
    def from_nchw(self, x):
        """(N,C,H,W) host or device array -> activation in the backend layout."""

    def to_nchw(self, a):
        """Activation in the backend layout -> (N,C,H,W) array of ``xp``."""

    def asarray(self, a, dtype=None):
        """Host array -> array of ``xp`` (parameters, targets)."""

    def to_host(self, a):
        """Array of ``xp`` -> numpy array."""

    # -- convolution (3x3 pad 1, or 1x1 pad 0; stride 1) ---------------------
    def conv2d_forward(self, x, w, b, relu: bool = False):
        """x (N,Cin,H,W), w (Cout,Cin,k,k), b (Cout) -> (y (N,Cout,H,W), cache).

        y = conv(x, w) + b, then max(y, 0) when ``relu`` (fused)."""

    def conv2d_backward(self, dy, cache, need_dx: bool = True):
        """dy (N,Cout,H,W) -> (dx or None, dw (Cout,Cin,k,k), db (Cout))."""

    # -- ReLU (unfused) -----------------------------------------------------
    def relu_forward(self, x):
        """y = max(x, 0) -> (y, cache)."""

    def relu_backward(self, dy, cache):
        """dx = dy * [x > 0]."""

    # -- 2x2 max-pool, stride 2 ----------------------------------------------
    def maxpool2x2_forward(self, x):
        """x (N,C,H,W) -> (y (N,C,H/2,W/2), cache holding the argmax 0..3)."""

    def maxpool2x2_backward(self, dy, cache):
        """dy (N,C,H/2,W/2) -> dx (N,C,H,W): each dy goes to its window's argmax."""

    # -- 2x2 transposed convolution, stride 2 --------------------------------
    def upconv2x2_forward(self, x, w, b):
        """x (N,Cin,H,W), w (Cin,Cout,2,2), b (Cout) -> (y (N,Cout,2H,2W), cache)."""

    def upconv2x2_backward(self, dy, cache):
        """dy (N,Cout,2H,2W) -> (dx (N,Cin,H,W), dw (Cin,Cout,2,2), db (Cout))."""

    # -- skip connection -------------------------------------------------------
    def concat_channels(self, a, b):
        """a (N,Ca,H,W), b (N,Cb,H,W) -> (N,Ca+Cb,H,W), a's channels first."""

    def split_channels(self, d, ca: int):
        """d (N,Ca+Cb,H,W) -> (d[:, :ca], d[:, ca:]): the adjoint of concat."""

    # -- output and loss -----------------------------------------------------
    def sigmoid(self, z):
        """Elementwise 1 / (1 + exp(-z)), stable for any z (NCHW in and out)."""

    def sigmoid_bce(self, z, y):
        """Fused sigmoid + binary cross-entropy on NCHW logits z and targets y.

        Returns (mean loss as a Python float, dz) with
            loss = mean(max(z,0) - z*y + log(1 + exp(-|z|)))
            dz   = (sigmoid(z) - y) / z.size
        """

    # -- optimizer -----------------------------------------------------------
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """One bias-corrected Adam step (t counts from 1), in place on p, m, v."""


def get_backend(name: str = "auto", dtype: str = "float32"):
    """Return a backend instance by name: numpy, numba, cupy or auto.

    ``auto`` picks cupy when a CUDA device answers, else numba.
    Raises ValueError for an unknown name or a dtype the backend lacks.
    """
    name = (name or "auto").lower()
    if name == "auto":
        from minunet.kernels.cupy_gpu import cuda_available

        name = "cupy" if cuda_available() else "numba"
    if name == "numpy":
        from minunet.kernels.numpy_ref import NumpyBackend

        return NumpyBackend(dtype)
    if name == "numba":
        from minunet.kernels.numba import NumbaBackend

        return NumbaBackend(dtype)
    if name == "cupy":
        from minunet.kernels.cupy_gpu import CupyBackend

        return CupyBackend(dtype)
    raise ValueError(f"unknown backend {name!r}: choose auto, numpy, numba or cupy")


def check_dtype(dtype, allowed=("float32", "float64")) -> str:
    """Normalise a dtype name and refuse the ones a backend does not take."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is not supported here: choose {' or '.join(allowed)}")
    return name
