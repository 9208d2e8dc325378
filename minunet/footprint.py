"""The U-Net's size from its settings, without building it: parameters, FLOPs and memory per layer
(``minunet summary`` prints them), and the memory a training needs (``train`` checks it before it
allocates anything, so ``--base-channels 100000`` is refused with the figure, not a MemoryError).
The layers and widths are model.py's: level i has C * 2**i channels, the bottleneck C * 2**D.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from minunet.errors import ConfigError

FLOAT_BYTES = 4  # float32


class LayerRow(NamedTuple):
    name: str
    shape: tuple  # the output for one image, (1, C, H, W)
    params: int
    flops: int
    activation_bytes: int  # float32 output of one image


def layer_rows(in_channels: int, base_channels: int, depth: int, size: int) -> list[LayerRow]:
    """Every layer of ``UNet(in_channels, base_channels, depth)`` on a size x size input, in forward order.

    FLOPs count a multiply-add as 2: a k x k conv costs 2*Cin*k*k*Cout*H*W; the 2x2 stride-2 up-conv
    2*Cin*Cout*(2H)*(2W) (each output value is Cin multiply-adds); max-pool counts 3 comparisons per
    output value. Parameters: a conv has Cout*Cin*k*k weights and Cout biases, the up-conv Cin*Cout*4
    and Cout."""
    D = depth
    widths = [base_channels * 2**i for i in range(D + 1)]
    rows = [LayerRow("input", (1, in_channels, size, size), 0, 0, in_channels * size * size * FLOAT_BYTES)]

    def add(name, cout, h, params, flops):
        rows.append(LayerRow(name, (1, cout, h, h), params, int(flops), cout * h * h * FLOAT_BYTES))

    def conv(name, cin, cout, h, k=3):
        add(name, cout, h, cout * cin * k * k + cout, 2 * cin * k * k * cout * h * h)

    h, c = size, in_channels
    for i in range(D):
        conv(f"enc{i}.conv1 3x3+relu", c, widths[i], h)
        conv(f"enc{i}.conv2 3x3+relu", widths[i], widths[i], h)
        c = widths[i]
        h //= 2
        add(f"pool{i} 2x2", c, h, 0, 3 * c * h * h)
    conv("bottleneck.conv1 3x3+relu", c, widths[D], h)
    conv("bottleneck.conv2 3x3+relu", widths[D], widths[D], h)
    c = widths[D]
    for i in reversed(range(D)):
        h *= 2
        # the up-conv writes after a copy of the skip, in one buffer: its output is the concatenation
        add(f"dec{i}.up 2x2 s2 +skip", 2 * widths[i], h, c * widths[i] * 4 + widths[i], 2 * c * widths[i] * h * h)
        conv(f"dec{i}.conv1 3x3+relu", 2 * widths[i], widths[i], h)
        conv(f"dec{i}.conv2 3x3+relu", widths[i], widths[i], h)
        c = widths[i]
    conv("head 1x1", c, 1, h, k=1)
    return rows


class TrainingMemory(NamedTuple):
    """A lower bound of a training's memory, in bytes (backward needs more, for a while)."""

    weights: int  # weights, gradients and Adam's two moments: 4 float32 copies of the parameters
    activations: int  # the layer outputs of one batch kept for backward (kept_rows)
    images: int  # the decoded images and masks, uint8

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.images


def kept_rows(rows: list[LayerRow]) -> list[LayerRow]:
    """The rows whose outputs a training forward keeps for the backward as arrays of their own: all but
    each encoder level's last conv, whose output lives on as the skip part of the decoder's [skip | up]
    buffer (the up-conv's row) once that level's up-conv has copied it (``Backend.skip_part``)."""
    return [r for r in rows if not (r.name.startswith("enc") and ".conv2 " in r.name)]


def training_memory(base_channels: int, depth: int, size: int, batch_size: int, n_images: int,
                    in_channels: int = 1) -> TrainingMemory:
    rows = layer_rows(in_channels, base_channels, depth, size)
    return TrainingMemory(4 * FLOAT_BYTES * sum(r.params for r in rows),
                          batch_size * sum(r.activation_bytes for r in kept_rows(rows)), n_images * 2 * size * size)


def check_training_memory(base_channels: int, depth: int, size: int, batch_size: int, n_images: int, backend):
    """Raise ConfigError when ``training_memory`` (a lower bound) exceeds the device's memory: the GPU's
    for the cupy backend, this machine's RAM otherwise (where it cannot be read: no check)."""
    need = training_memory(base_channels, depth, size, batch_size, n_images)
    on_gpu = backend.name == "cupy"
    try:
        have = (backend.xp.cuda.Device().mem_info[1] if on_gpu
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return
    total = need.weights + need.activations + (0 if on_gpu else need.images)  # the images stay on the host
    if total > have:
        images = "" if on_gpu else f", the decoded images {human(need.images, 'B')}"
        raise ConfigError(
            f"--base-channels {base_channels} --depth {depth} --size {size} --batch-size {batch_size} would need "
            f"at least {human(total, 'B')} of memory (weights, gradients and Adam moments {human(need.weights, 'B')}, "
            f"the activations of a batch {human(need.activations, 'B')}{images}) but "
            f"{'the GPU' if on_gpu else 'this machine'} has {human(have, 'B')}: choose a smaller --base-channels, "
            "--depth, --size or --batch-size ('minunet summary' shows the memory per layer)")


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (with ``unit`` 'B': '1.23 MB'); decimal prefixes up to T."""
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _root(a):
    """The array that owns a's memory (a itself, or the end of its chain of ``.base`` views)."""
    while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
        a = a.base
    return a


def cache_bytes(model) -> dict[str, int]:
    """Bytes the layers' caches hold for the backward, by op kind, after a training forward of ``model``.

    Walks every layer's cache in forward order (``enc{i}`` convs and pool ``i``, the bottleneck, then per
    decoder level the up-conv and the convs, the head). Each buffer counts once, for the first op that
    holds it (a view counts as the whole array it views: the buffer the view keeps alive), so a conv
    whose input is the previous conv's output adds nothing for its input. The parameters are not
    counted (they live as long as the model). Keys: op kind and cache field, e.g. ``conv3x3.x`` (the
    inputs of the 3x3 convs not already held), ``conv3x3.y``, ``maxpool2x2.argmax``; ``total`` is their
    sum."""
    params = {id(_root(p)) for p in model.params.values()}
    layers = []
    for i, block in enumerate(model.enc):
        layers += [layer for _, layer in block.named_layers()] + [model.pools[i]]
    layers += [layer for _, layer in model.bottleneck.named_layers()]
    for i in reversed(range(model.depth)):
        layers += [model.ups[i]] + [layer for _, layer in model.dec[i].named_layers()]
    layers.append(model.head)
    seen, out = set(params), {}
    for layer in layers:
        if layer.cache is None:
            continue
        if hasattr(layer, "relu"):
            k = layer.params["weight"].shape[-1]
            kind = f"conv{k}x{k}"
        else:
            kind = "upconv2x2" if layer.params else "maxpool2x2"
        for field, value in zip(layer.cache._fields, layer.cache, strict=True):
            root = _root(value)
            if not hasattr(root, "nbytes") or id(root) in seen:
                continue
            seen.add(id(root))
            out[f"{kind}.{field}"] = out.get(f"{kind}.{field}", 0) + int(root.nbytes)
    out["total"] = sum(out.values())
    return out
