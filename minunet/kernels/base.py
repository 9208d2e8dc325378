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

NaN rule (every backend, every op): NaN and inf propagate, so the training
loop's non-finite-loss guard sees them and a NaN weight never becomes a silent
dead channel. Concretely, as the NumPy reference computes it:
- ReLU forward (fused or not) keeps a NaN: max(NaN, 0) = NaN.
- ReLU backward is the product dx = dy * [y > 0], not a select: a NaN or inf
  in dy gives NaN even where y <= 0, and a NaN y counts as "not > 0".
- Max-pool: a NaN in the window wins. The argmax is the first NaN in window
  order (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), else the
  first maximum (ties -> lowest index), exactly as ``numpy.argmax``.
- Everything else (convolutions, sums, sigmoid, BCE, Adam, copies) is plain
  IEEE arithmetic, which propagates NaN by itself. One place where backends
  may differ: where a non-finite value meets a convolution's zero padding,
  0 * NaN is NaN for a kernel that multiplies the padding (im2col) and absent
  for one that skips it (numba's direct kernels), so border pixels may differ
  in which are NaN; every pixel that actually reads the NaN is NaN everywhere.

Required ops are abstract below. Three optional ones (``synchronize``,
``upload_async``, ``sigmoid_bce_device``) have CPU defaults here, which a GPU
backend overrides to keep work queued on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Backend(ABC):
    """What a backend provides. ``numpy_ref.NumpyBackend`` is the spec every other one is tested against."""

    name: str
    xp: Any  # the array module: numpy or cupy
    # True where ops are queued on a device and return at once (a GPU): reading a result on the host
    # (float() of a loss) then waits for every queued op, so the training loop reads losses only now and then.
    asynchronous: bool = False

    # -- layout --------------------------------------------------------------
    @abstractmethod
    def from_nchw(self, x):
        """(N,C,H,W) host or device array -> activation in the backend layout."""

    @abstractmethod
    def to_nchw(self, a):
        """Activation in the backend layout -> (N,C,H,W) array of ``xp``."""

    @abstractmethod
    def asarray(self, a, dtype=None):
        """Host array -> array of ``xp`` (parameters, targets)."""

    @abstractmethod
    def to_host(self, a):
        """Array of ``xp`` -> numpy array."""

    # -- convolution (3x3 pad 1, or 1x1 pad 0; stride 1) ---------------------
    @abstractmethod
    def conv2d_forward(self, x, w, b, relu: bool = False):
        """x (N,Cin,H,W), w (Cout,Cin,k,k), b (Cout) -> (y (N,Cout,H,W), cache).

        y = conv(x, w) + b, then max(y, 0) when ``relu`` (fused; keeps NaN)."""

    @abstractmethod
    def conv2d_backward(self, dy, cache, need_dx: bool = True):
        """dy (N,Cout,H,W) -> (dx or None, dw (Cout,Cin,k,k), db (Cout)).

        With ReLU fused, dy is first multiplied by [y > 0] (the ReLU backward)."""

    # -- ReLU (unfused) -----------------------------------------------------
    @abstractmethod
    def relu_forward(self, x):
        """y = max(x, 0), NaN kept -> (y, cache)."""

    @abstractmethod
    def relu_backward(self, dy, cache):
        """dx = dy * [y > 0], a product (NaN or inf in dy stays NaN where y <= 0)."""

    # -- 2x2 max-pool, stride 2 ----------------------------------------------
    @abstractmethod
    def maxpool2x2_forward(self, x):
        """x (N,C,H,W) -> (y (N,C,H/2,W/2), cache holding the argmax 0..3; NaN wins)."""

    @abstractmethod
    def maxpool2x2_backward(self, dy, cache):
        """dy (N,C,H/2,W/2) -> dx (N,C,H,W): each dy goes to its window's argmax."""

    # -- 2x2 transposed convolution, stride 2, and the skip connection ----------
    @abstractmethod
    def upconv2x2_forward(self, x, w, b, skip):
        """x (N,Cin,H,W), w (Cin,Cout,2,2), b (Cout), skip (N,Cs,2H,2W) -> (y (N,Cs+Cout,2H,2W), cache).

        y[:, :Cs] = skip and y[:, Cs:] = the up-conv of x: the decoder's concatenation is
        written in place, the up-conv's output straight into its channels of y."""

    @abstractmethod
    def upconv2x2_backward(self, dy, cache):
        """dy (N,Cs+Cout,2H,2W) -> (dx (N,Cin,H,W), dw (Cin,Cout,2,2), db (Cout), dskip (N,Cs,2H,2W)).

        The up-conv's gradients come from dy[:, Cs:]; dskip is dy[:, :Cs] (a view of dy
        where the layout allows: it keeps dy alive, so treat it as read-only)."""

    @abstractmethod
    def skip_part(self, y, skip):
        """y (N,Cs+Cout,2H,2W) from upconv2x2_forward(x, w, b, skip) -> y[:, :Cs], a view: skip's values.

        The model hands it to the encoder conv whose output the skip was, in place of that output
        (the ReLU mask of its backward), so the skip is not kept twice for the backward."""

    # -- output and loss -----------------------------------------------------
    @abstractmethod
    def sigmoid(self, z):
        """Elementwise 1 / (1 + exp(-z)), stable for any z (NCHW in and out)."""

    @abstractmethod
    def sigmoid_bce(self, z, y, w=None):
        """Fused sigmoid + binary cross-entropy on NCHW logits z and targets y, each pixel weighted by w
        (an array of z's shape, or None: every weight 1).

        Returns (loss as a Python float, dz) with, per pixel,
            l    = max(z,0) - z*y + log(1 + exp(-|z|))      (stable for any z)
            loss = sum(w * l) / z.size
            dz   = w * (sigmoid(z) - y) / z.size
        The sum is divided by the number of pixels, not by sum(w): with w = None (or all ones) it is the
        mean BCE, and a batch split across ranks still sums back to the whole batch's loss.
        y (and w) of another shape than z: ValueError.
        """

    # -- optimizer -----------------------------------------------------------
    @abstractmethod
    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, t):
        """One bias-corrected Adam step (t counts from 1), in place on p, m, v."""

    # -- optional: device queue and input pipeline (CPU defaults) ---------------
    def synchronize(self):
        """Wait until all queued device work is done (before timing, or reading results).

        Default: nothing to wait for; a CPU backend computes each op before it returns."""
        return None

    def upload_async(self, *arrays, slots: int = 2):
        """Queue the upload of one batch of host arrays; return arrays of ``xp`` at once.

        ``xb, yb = be.upload_async(x, y)``; one array in gives one array back, several
        give a tuple, shapes unchanged (no layout change: call ``from_nchw`` after).
        Contract: a returned array stays valid until ``slots`` more calls (a GPU backend
        reuses a ring of ``slots`` device buffers), so call it for batch k+1 after
        queueing the step that reads batch k.

        Default: ``asarray`` of each, at once (no copy when the array already has the
        backend's dtype, so do not overwrite a host batch the step still reads)."""
        out = tuple(self.asarray(a) for a in arrays)
        return out if len(out) != 1 else out[0]

    def sigmoid_bce_device(self, z, y, w=None):
        """As ``sigmoid_bce``, but returns (loss as a 0-d float64 array of ``xp``, dz).

        A GPU backend leaves the loss on the device, so a training loop need not wait
        for the GPU at every step: call float() on it only when it logs.
        Default: ``sigmoid_bce``'s float, wrapped as a 0-d array."""
        loss, dz = self.sigmoid_bce(z, y, w)
        return self.xp.asarray(loss, dtype=self.xp.float64), dz


def check_dtype(dtype, allowed=("float32", "float64")) -> str:
    """Normalise a dtype name and refuse the ones a backend does not take (ValueError)."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is not supported here: choose {' or '.join(allowed)}")
    return name


def check_same_shape(z, y, w=None) -> None:
    """The fused loss reads targets y (and weights w) element for element with the logits z: refuse any
    other shape (ValueError) rather than broadcast or read past the end."""
    for label, a in (("targets y", y), ("weights w", w)):
        if a is not None and tuple(a.shape) != tuple(z.shape):
            raise ValueError(f"sigmoid_bce: {label} have shape {tuple(a.shape)}, logits z have {tuple(z.shape)}: "
                             "they must match")
