"""Widen a trained U-Net without changing what it computes (Net2WiderNet, Chen et al., ICLR 2016).

A model of base width C becomes one of base width k*C whose output is the same up to rounding, so
a wider network can start training from where a narrower one stopped instead of from scratch.

Every hidden channel c of a layer with C channels is copied k times, to channels c, c + C, ...,
c + (k-1)*C (``channel j`` of the wide layer is a copy of ``j % C``):

- outgoing side (the layer that makes the channel): its weight rows and bias are repeated, so all
  k copies carry the same activation (ReLU of the same pre-activation, max-pooled alike), as long
  as the rows' own incoming splits (below) sum to the narrow weights: each copy gets its own split;
- incoming side (each layer that reads the channel): the weights that read channel c are split
  between its k copies with factors f_0 + ... + f_{k-1} = 1, so the sum they feed forward is
  unchanged: sum_r f_r * W[o, c] * a_c = W[o, c] * a_c.

Equal factors 1/k would keep the copies identical for ever (they get equal gradients), so the
factors are 1/k plus seeded noise of mean zero across the copies: f_r = 1/k + e_r - mean(e); the
output is still the same (the f_r still sum to 1), and the copies drift apart as training goes on.

The U-Net's channel groups (``minunet.model``): enc0 reads the image (its channels not widened);
dec{i}.conv1 reads the concatenation [skip | up], two groups of ``widths[i]`` channels, each widened
on its own; the up-convs' weights are (Cin, Cout, 2, 2), the convs' (Cout, Cin, k, k); the head
makes one logit (not widened).
"""

from __future__ import annotations

import numpy as np

# The split factors' seeded noise: standard deviation NOISE / k before its mean over the k copies is
# taken out (so k * (1/k + e_r) stays within about 1 +- NOISE). Large enough for the copies to part
# in a few steps of Adam, small enough to keep the product of factors near the narrow weight.
SEED, NOISE = 0, 0.1


def _channel_map(groups: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(source channel, copy index) of each widened channel, for an input made of ``groups`` (sizes)
    concatenated: group g (size n, at offset o) becomes k*n channels; channel j is copy j // n of
    channel o + j % n."""
    src, copy, offset = [], [], 0
    for n in groups:
        j = np.arange(k * n)
        src.append(offset + j % n)
        copy.append(j // n)
        offset += n
    return np.concatenate(src), np.concatenate(copy)


def _layer_groups(base: int, depth: int) -> dict[str, tuple[list[int] | None, bool]]:
    """layer prefix -> (input channel groups, or None if the input is not widened; output widened?)."""
    widths = [base * 2**i for i in range(depth + 1)]
    spec = {}
    cin = None  # enc0 reads the image
    for i in range(depth):
        spec[f"enc{i}.conv1"] = (cin, True)
        spec[f"enc{i}.conv2"] = ([widths[i]], True)
        cin = [widths[i]]
    spec["bottleneck.conv1"] = ([widths[depth - 1]], True)
    spec["bottleneck.conv2"] = ([widths[depth]], True)
    for i in reversed(range(depth)):
        spec[f"dec{i}.up"] = ([widths[i + 1]], True)
        spec[f"dec{i}.conv1"] = ([widths[i], widths[i]], True)  # [skip | up]
        spec[f"dec{i}.conv2"] = ([widths[i]], True)
    spec["head"] = ([base], False)
    return spec


def widen_params(params: dict, base: int, depth: int, factor: int, seed: int = SEED, noise: float = NOISE) -> dict:
    """The parameters of a U-Net of base width ``factor * base`` computing what ``params`` computes.

    ``noise``: standard deviation of the split factors' noise, relative to 1/factor, before its mean
    over the copies is taken out (0: equal splits, copies that never part)."""
    if not isinstance(factor, int | np.integer) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a whole number >= 1, got {factor!r}")
    rng = np.random.default_rng(seed)
    spec = _layer_groups(base, depth)
    out = {}
    for name in params:  # forward order, so the noise draws are the same on every run
        prefix, kind = name.rsplit(".", 1)
        groups, widen_out = spec[prefix]
        a = np.asarray(params[name], dtype=np.float64)
        up = prefix.endswith(".up")
        out_axis, in_axis = (1, 0) if up else (0, 1)
        if kind == "bias":
            out[name] = np.tile(a, factor) if widen_out else a.copy()
            continue
        if widen_out:
            a = np.take(a, _channel_map([a.shape[out_axis]], factor)[0], axis=out_axis)
        if groups is not None and factor > 1:
            src, copy = _channel_map(groups, factor)
            # noise per (input copy, weight of this layer with its outputs already copied), of mean
            # zero over the input copies: the split factors of each weight sum to exactly 1
            e = rng.normal(0.0, noise / factor, size=(factor,) + a.shape)
            e -= e.mean(axis=0)
            e = np.moveaxis(np.moveaxis(e, in_axis + 1, -1)[copy, ..., src], 0, -1)  # in axis last
            a = np.moveaxis(np.moveaxis(np.take(a, src, axis=in_axis), in_axis, -1) * (1.0 / factor + e),
                            -1, in_axis)
        out[name] = a
    return {n: v.astype(np.asarray(params[n]).dtype) for n, v in out.items()}


def widened_model(model, factor: int, seed: int = SEED, noise: float = NOISE):
    """A new UNet (same backend, dtype and depth) of ``factor`` times ``model``'s base width, with the
    weights of ``widen_params``: its forward pass gives ``model``'s output up to rounding."""
    from minunet.model import UNet

    be = model.backend
    params = {n: np.asarray(be.to_host(p)) for n, p in model.params.items()}
    wide = widen_params(params, model.base_channels, model.depth, factor, seed, noise)
    out = UNet(model.in_channels, model.base_channels * factor, model.depth, backend=be, dtype=model.dtype)
    for name, p in out.params.items():
        p[...] = be.asarray(wide[name].astype(out.dtype, copy=False))
    return out
