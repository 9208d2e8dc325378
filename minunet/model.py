"""The U-Net: an encoder of D levels, a bottleneck, a decoder of D levels, a 1x1 head.

    level i (0..D-1) has C * 2**i channels; the bottleneck has C * 2**D.

    x (N,1,H,W)
    enc0: DoubleConv 1 -> C        ----------- skip0 ---------------.
    pool  -> H/2                                                    |
    enc1: DoubleConv C -> 2C       ---- skip1 ------.               |
    pool  -> H/4                                    |               |
    ...                                             |               |
    bottleneck: DoubleConv C*2**(D-1) -> C*2**D     |               |
    dec{D-1}: up (x2), concat(skip, up), DoubleConv |               |
    ...                                             '               |
    dec0: up (x2) C*2 -> C, concat(skip0, up) -> 2C, DoubleConv 2C -> C
    head: 1x1 conv C -> 1: one logit per pixel (N,1,H,W)

The up-conv and the concatenation are one op (``UpConv2d``): the up-conv writes its output after a
copy of the skip, in one buffer, and its backward hands back the skip's part of the gradient.

Parameters are named ``enc{i}.conv{1,2}.{weight,bias}``, ``bottleneck.conv{1,2}.*``,
``dec{i}.up.*`` and ``dec{i}.conv{1,2}.*`` (deepest first), ``head.*``, in forward order.
"""

from __future__ import annotations

import numpy as np

from minunet.errors import ConfigError
from minunet.kernels import get_backend
from minunet.kernels.base import check_dtype
from minunet.layers import Conv2d, DoubleConv, MaxPool2d, UpConv2d


def check_size(size, depth):
    """Raise ConfigError unless images resized to size x size fit a U-Net of ``depth`` levels.

    Each of the ``depth`` pools halves H and W and each up-conv doubles them back to
    the skip's size, so H and W must be multiples of 2**depth (the same rule as
    ``UNet.check_input_shape``, worded for the --size and --depth flags)."""
    f = 2**depth
    if size < f or size % f:
        raise ConfigError(
            f"--size {size} is not divisible by 2**depth = {f}: use a multiple of {f} "
            f"(e.g. {max(f, size // f * f)}) or a smaller --depth"
        )


class UNet:
    def __init__(
        self, in_channels=1, base_channels=16, depth=4, backend="numpy", dtype="float32", seed=0
    ):
        for label, value in (("in_channels", in_channels), ("base_channels", base_channels), ("depth", depth)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a whole number >= 1, got {value!r}")
        self.in_channels, self.base_channels, self.depth = int(in_channels), int(base_channels), int(depth)
        self.dtype = check_dtype(dtype)
        self.backend = get_backend(backend, self.dtype) if isinstance(backend, str) else backend
        self.seed = seed
        rng = np.random.default_rng(seed)
        be, C, D, dt = self.backend, self.base_channels, self.depth, self.dtype

        self.widths = [C * 2**i for i in range(D + 1)]  # channels per level; [-1] is the bottleneck
        self.enc = []
        cin = self.in_channels
        for i in range(D):
            self.enc.append(DoubleConv(be, cin, self.widths[i], rng, dt))
            cin = self.widths[i]
        self.pools = [MaxPool2d(be) for _ in range(D)]
        self.bottleneck = DoubleConv(be, self.widths[D - 1], self.widths[D], rng, dt)
        self.ups, self.dec = {}, {}
        for i in reversed(range(D)):  # deepest first, as in forward order
            self.ups[i] = UpConv2d(be, self.widths[i + 1], self.widths[i], rng, dt)
            self.dec[i] = DoubleConv(be, 2 * self.widths[i], self.widths[i], rng, dt)
        self.head = Conv2d(be, C, 1, 1, False, rng, dt)

        self.params, self.grads = {}, {}
        for prefix, layer in self.named_layers():
            for pname in layer.params:
                self.params[f"{prefix}.{pname}"] = layer.params[pname]
                self.grads[f"{prefix}.{pname}"] = layer.grads[pname]

    def named_layers(self):
        """(dotted prefix, layer) for every layer with parameters, in forward order."""
        out = []
        for i, block in enumerate(self.enc):
            out += [(f"enc{i}.{n}", layer) for n, layer in block.named_layers()]
        out += [(f"bottleneck.{n}", layer) for n, layer in self.bottleneck.named_layers()]
        for i in reversed(range(self.depth)):
            out.append((f"dec{i}.up", self.ups[i]))
            out += [(f"dec{i}.{n}", layer) for n, layer in self.dec[i].named_layers()]
        out.append(("head", self.head))
        return out

    @property
    def config(self):
        return {
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "dtype": self.dtype,
        }

    def num_params(self):
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def check_input_shape(self, shape):
        """Raise ValueError unless shape is (N, in_channels, H, W) with H, W divisible by 2**depth."""
        if len(shape) != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(shape)}")
        _, c, h, w = shape
        if c != self.in_channels:
            raise ValueError(f"the model takes {self.in_channels} input channel(s), got {c}")
        f = 2**self.depth
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(
                f"image size {h}x{w} is not divisible by 2**depth = {f}: "
                f"use a size that is a multiple of {f} (e.g. {max(f, (h // f) * f)})"
            )

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def forward(self, x, train=True):
        """x (N, in_channels, H, W) -> logits (N, 1, H, W), NCHW arrays of backend.xp.

        ``train=False`` is inference, bitwise the same logits: no layer keeps its cache for a
        backward pass, so each activation is freed once the next op has read it; only the
        encoder outputs wait for their decoder level (the skips), and each leaves as it is used."""
        self.check_input_shape(x.shape)
        be = self.backend
        a = be.from_nchw(x)
        skips = []
        for block, pool in zip(self.enc, self.pools, strict=True):
            s = block.forward(a, train)
            skips.append(s)
            a = pool.forward(s, train)
        del s  # the last encoder output now lives in skips alone, and leaves with it
        a = self.bottleneck.forward(a, train)
        for i in reversed(range(self.depth)):  # skips.pop(): the deepest level's skip first
            skip = skips.pop()
            a = self.ups[i].forward(a, skip, train)  # [skip | up(a)], one buffer
            if train:  # the encoder's cache keeps the buffer's copy of the skip, so its own array is freed
                self.enc[i].keep_output_as(be.skip_part(a, skip))
            del skip
            a = self.dec[i].forward(a, train)
        return be.to_nchw(self.head.forward(a, train))

    def backward(self, dlogits):
        """dlogits (N,1,H,W) -> adds every parameter's gradient into ``grads``.

        The encoder output of level i feeds both the pool and the skip
        concatenation, so its gradient is the sum of the two paths."""
        be = self.backend
        d = self.head.backward(be.from_nchw(dlogits))
        dskips = [None] * self.depth
        for i in range(self.depth):  # dec0 is the last decoder level in forward order
            d, dskips[i] = self.ups[i].backward(self.dec[i].backward(d))
        d = self.bottleneck.backward(d)
        for i in reversed(range(self.depth)):
            d = self.pools[i].backward(d)
            d += dskips[i]
            d = self.enc[i].backward(d, need_dx=i > 0)

    def predict_proba(self, x):
        """Sigmoid of the logits of an inference forward: per-pixel foreground probability, NCHW."""
        return self.backend.sigmoid(self.forward(x, train=False))
