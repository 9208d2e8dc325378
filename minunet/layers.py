"""Layers: thin objects that own parameters and call the backend's ops.

Each layer keeps the cache of its last training forward and adds its
parameter gradients into ``grads`` (zeroed by ``UNet.zero_grad``), so the
model can run forward, then backward, with no bookkeeping of its own. The
backward consumes the cache: a layer drops it once its gradients are out, so
the activations held for the backward are freed as the backward pass goes on
(and none are held between steps); a second backward needs a new forward.
``forward(x, train=False)`` is inference: the cache is dropped as soon as the
op returns (and the last training forward's with it), so activations are
freed as the pass goes on.
"""

from __future__ import annotations

import numpy as np


def take_cache(layer):
    """The layer's cache, handed to its backward and dropped from the layer (the backward consumes it)."""
    cache, layer.cache = layer.cache, None
    if cache is None:
        raise RuntimeError(f"{type(layer).__name__}.backward needs a training forward first "
                           "(forward with train=True); each forward's cache serves one backward")
    return cache


class Conv2d:
    """k x k convolution, stride 1, zero padding k//2, optional fused ReLU.

    weight (Cout, Cin, k, k), bias (Cout,): PyTorch's Conv2d layout.
    He initialisation: weight ~ N(0, 2 / (Cin*k*k)), bias = 0.
    """

    def __init__(self, backend, cin, cout, k, relu, rng, dtype):
        self.backend, self.relu = backend, relu
        std = np.sqrt(2.0 / (cin * k * k))
        self.params = {
            "weight": backend.asarray(rng.normal(0.0, std, (cout, cin, k, k)).astype(dtype)),
            "bias": backend.asarray(np.zeros(cout, dtype=dtype)),
        }
        self.grads = {n: backend.xp.zeros_like(p) for n, p in self.params.items()}
        self.cache = None

    def forward(self, x, train=True):
        y, cache = self.backend.conv2d_forward(x, self.params["weight"], self.params["bias"], relu=self.relu)
        self.cache = cache if train else None
        return y

    def keep_output_as(self, view):
        """After a training forward: ``view`` holds the same values as this conv's output (the skip's
        copy in the decoder's [skip | up] buffer, ``Backend.skip_part``); the cache keeps it as the
        ReLU mask instead, so the output's own array can be freed and the skip is held once."""
        if self.cache is not None and getattr(self.cache, "y", None) is not None:
            self.cache = self.cache._replace(y=view)

    def backward(self, dy, need_dx=True):
        dx, dw, db = self.backend.conv2d_backward(dy, take_cache(self), need_dx=need_dx)
        self.grads["weight"] += dw
        self.grads["bias"] += db
        return dx


class MaxPool2d:
    """2x2 max-pool, stride 2. No parameters."""

    params: dict = {}
    grads: dict = {}

    def __init__(self, backend):
        self.backend = backend
        self.cache = None

    def forward(self, x, train=True):
        y, cache = self.backend.maxpool2x2_forward(x)
        self.cache = cache if train else None
        return y

    def backward(self, dy):
        return self.backend.maxpool2x2_backward(dy, take_cache(self))


class UpConv2d:
    """2x2 transposed convolution, stride 2 (doubles H and W), written after the skip connection:
    the output is [skip | up-conv(x)] along channels, the decoder's concatenation.

    weight (Cin, Cout, 2, 2), bias (Cout,): PyTorch's ConvTranspose2d layout.
    He initialisation: each output pixel sums Cin inputs, one tap each, so
    weight ~ N(0, 2 / Cin).
    """

    def __init__(self, backend, cin, cout, rng, dtype):
        self.backend = backend
        std = np.sqrt(2.0 / cin)
        self.params = {
            "weight": backend.asarray(rng.normal(0.0, std, (cin, cout, 2, 2)).astype(dtype)),
            "bias": backend.asarray(np.zeros(cout, dtype=dtype)),
        }
        self.grads = {n: backend.xp.zeros_like(p) for n, p in self.params.items()}
        self.cache = None

    def forward(self, x, skip, train=True):
        y, cache = self.backend.upconv2x2_forward(x, self.params["weight"], self.params["bias"], skip)
        self.cache = cache if train else None
        return y

    def backward(self, dy):
        """dy of [skip | up-conv] -> (dx, dskip); dskip may be a view of dy."""
        dx, dw, db, dskip = self.backend.upconv2x2_backward(dy, take_cache(self))
        self.grads["weight"] += dw
        self.grads["bias"] += db
        return dx, dskip


class DoubleConv:
    """conv3x3 -> ReLU -> conv3x3 -> ReLU: the unit of every U-Net level."""

    def __init__(self, backend, cin, cout, rng, dtype):
        self.conv1 = Conv2d(backend, cin, cout, 3, True, rng, dtype)
        self.conv2 = Conv2d(backend, cout, cout, 3, True, rng, dtype)

    def named_layers(self):
        return [("conv1", self.conv1), ("conv2", self.conv2)]

    def forward(self, x, train=True):
        return self.conv2.forward(self.conv1.forward(x, train), train)

    def keep_output_as(self, view):
        """The block's output (its second conv's) now lives in ``view`` too: see Conv2d.keep_output_as."""
        self.conv2.keep_output_as(view)

    def backward(self, dy, need_dx=True):
        return self.conv1.backward(self.conv2.backward(dy), need_dx=need_dx)
