"""Deepen a trained U-Net by one level without changing what it computes (after Net2DeeperNet, Chen et
al., ICLR 2016).

A U-Net of depth D sees the image through D poolings; one more level doubles the region each output
pixel can see, which a model needs to place the outline of a lung it cannot see (a consolidated,
white lung looks like the heart and the soft tissue around it). Training that deeper model from
where the shallower one stopped keeps what it learned.

Depth D has ``enc0..enc{D-1}``, a bottleneck (widths[D-1] -> widths[D]) and ``dec{D-1}..dec0``.
Depth D + 1 gets:

- ``enc{D}``: the old bottleneck, unchanged (same shapes: widths[D-1] -> widths[D]); its output a
  (post-ReLU, so a >= 0) is the new level's skip;
- a new bottleneck (widths[D] -> widths[D+1]) and up-conv ``dec{D}.up`` (widths[D+1] -> widths[D]):
  freshly initialised, as a new model of depth D + 1 would be (``seed``);
- ``dec{D}.conv1`` reads [skip | up]: the identity on the skip (w[o, o, 1, 1] = 1, the centre tap
  of the 3x3 kernel), zero on the up-conv's channels, bias 0; ``dec{D}.conv2``: the identity, bias 0.
  Both are followed by a ReLU, and ReLU(a) = a for a >= 0, so ``dec{D}`` hands a on unchanged to the
  old ``dec{D-1}.up``, and the output is the old one exactly (up to rounding in the sums).
- every other layer: the old weights under the same names.

The zero weights on the up-conv's channels get a gradient (their input, the new path's output, is not
zero), so after the first step the new level takes part, as a zero-initialised residual branch does.
"""

from __future__ import annotations

import numpy as np

SEED = 0  # the new level's initialisation


def deepen_params(params: dict, base: int, depth: int, new_layers: dict) -> dict:
    """The parameters of a U-Net of depth ``depth + 1`` computing what ``params`` (depth ``depth``)
    computes; ``new_layers``: the parameters of a fresh depth + 1 model, whose new bottleneck and
    ``dec{depth}.up`` are taken as they are."""
    d = depth
    width = base * 2**d  # the old bottleneck's output channels: the new level's skip
    dtype = np.asarray(params["head.weight"]).dtype
    out = {}
    for name, a in params.items():
        prefix, kind = name.rsplit(".", 1)
        if prefix.startswith("bottleneck."):
            name = f"enc{d}." + prefix.split(".", 1)[1] + "." + kind  # the old bottleneck becomes enc{D}
        out[name] = np.asarray(a).copy()
    for name, a in new_layers.items():
        if name.startswith("bottleneck.") or name.startswith(f"dec{d}.up."):
            out[name] = np.asarray(a).astype(dtype)
    eye = np.zeros((width, width, 3, 3), dtype)
    eye[np.arange(width), np.arange(width), 1, 1] = 1
    out[f"dec{d}.conv1.weight"] = np.concatenate([eye, np.zeros_like(eye)], axis=1)  # reads [skip | up]
    out[f"dec{d}.conv1.bias"] = np.zeros(width, dtype)
    out[f"dec{d}.conv2.weight"] = eye.copy()
    out[f"dec{d}.conv2.bias"] = np.zeros(width, dtype)
    missing = set(new_layers) - set(out)
    if missing:
        raise ValueError(f"deepening left parameters unset: {sorted(missing)}")
    return {n: out[n] for n in new_layers}  # in the deeper model's order


def deepened_model(model, seed: int = SEED):
    """A new UNet (same backend, dtype and base width) one level deeper than ``model``, with the weights
    of ``deepen_params``: its forward pass gives ``model``'s output up to rounding."""
    from minunet.model import UNet

    be = model.backend
    out = UNet(model.in_channels, model.base_channels, model.depth + 1, backend=be, dtype=model.dtype, seed=seed)
    params = {n: np.asarray(be.to_host(p)) for n, p in model.params.items()}
    fresh = {n: np.asarray(be.to_host(p)) for n, p in out.params.items()}
    deep = deepen_params(params, model.base_channels, model.depth, fresh)
    for name, p in out.params.items():
        p[...] = be.asarray(deep[name].astype(out.dtype, copy=False))
    return out
