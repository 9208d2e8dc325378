"""Losses. Each returns (loss as a float, gradient w.r.t. the logits); the loss is a mean over the
batch (BCE: per pixel, optionally weighted; soft Dice: per image).

All take NCHW logits z and targets y of the same shape; ``backend`` defaults
to the NumPy reference (any float dtype). Pass the model's backend to keep
the work on its device. With ``on_device=True`` the loss is not turned into a Python float (which
would wait for a GPU to finish the step): it stays a float64 value of the backend's ``xp`` (a 0-d
array on a GPU; NumPy turns 0-d arithmetic into a numpy scalar), read later with ``float()``.
"""

from __future__ import annotations

from minunet.kernels.numpy_ref import NumpyBackend

_REFERENCE = NumpyBackend("float64")

LOSSES = ("bce", "bce+dice")


def _check(logits, targets):
    if logits.shape != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} differ in shape")


def bce_with_logits(logits, targets, backend=None, weights=None, on_device=False):
    """Binary cross-entropy on raw logits, fused with the sigmoid (the backend's ``sigmoid_bce``), each
    pixel weighted by ``weights`` (w >= 0 of the logits' shape; None: every weight 1).

    loss = sum(w * l) / z.size,  l = max(z,0) - z*y + log(1 + exp(-|z|))   (per pixel, stable for any z)
    dz   = w * (sigmoid(z) - y) / z.size

    Divided by the number of pixels, not by sum(w): with w = 1 it is the mean BCE, and the loss of a
    batch is still the mean of its pixels' losses, so a batch split across ranks sums back to it.
    Lung training weighs the pixels of the infection mask more (``--lesion-weight``): the consolidated,
    white parts of a lung are the ones a lung model leaves out, and they are few among the lung's pixels.
    ``on_device``: the loss as a float64 value of the backend's ``xp`` (``sigmoid_bce_device``), not a float.
    """
    be = backend or _REFERENCE  # its sigmoid_bce refuses targets or weights of another shape
    return (be.sigmoid_bce_device if on_device else be.sigmoid_bce)(logits, targets, weights)


def soft_dice_with_logits(logits, targets, backend=None, smooth=1.0, on_device=False):
    """Soft Dice loss, 1 - mean over images of (2 I + s) / (S + s), on p = sigmoid(z).

    Per image n:  I = sum p*y,  S = sum p + sum y,  dice_n = (2 I + s) / (S + s).
    Its gradient:  d dice_n / d p = (2 y (S + s) - (2 I + s)) / (S + s)^2,
    and d p / d z = p (1 - p), so  dz = -(1/N) * d dice_n/dp * p (1 - p).
    The smoothing s keeps empty-mask images defined (dice = 1 when p ~ 0).
    Unlike BCE, every image weighs the same whatever its mask's size, which
    speeds up learning the shape of the mask. ``on_device``: the loss as a float64 value of the
    backend's ``xp`` (no wait for a GPU), not a float; the same value.
    """
    _check(logits, targets)
    be = backend or _REFERENCE
    n = logits.shape[0]
    p = be.sigmoid(logits)
    y = targets.astype(p.dtype, copy=False)
    axes = tuple(range(1, logits.ndim))
    inter = (p * y).sum(axis=axes, keepdims=True)  # (N,1,1,1)
    total = p.sum(axis=axes, keepdims=True) + y.sum(axis=axes, keepdims=True)
    dice = (2 * inter + smooth) / (total + smooth)
    mean = dice.mean().astype(be.xp.float64)  # the image mean in p's dtype, as a float would hold it
    loss = 1.0 - (mean if on_device else float(mean))
    ddice_dp = (2 * y * (total + smooth) - (2 * inter + smooth)) / (total + smooth) ** 2
    dz = (-(1.0 / n) * ddice_dp * p * (1 - p)).astype(logits.dtype, copy=False)
    return loss, dz


def loss_and_grad(kind, logits, targets, backend=None, weights=None, on_device=False):
    """The training loss by name: 'bce' or 'bce+dice' (their sum). ``weights`` (None: every pixel 1) weigh
    the BCE term per pixel (``bce_with_logits``); the soft Dice term is unweighted. ``on_device``: the loss
    as a float64 value of the backend's ``xp`` (a GPU need not finish the step before it returns)."""
    if kind == "bce":
        return bce_with_logits(logits, targets, backend, weights, on_device)
    if kind == "bce+dice":
        l1, d1 = bce_with_logits(logits, targets, backend, weights, on_device)
        l2, d2 = soft_dice_with_logits(logits, targets, backend, on_device=on_device)
        d1 += d2
        return l1 + l2, d1
    raise ValueError(f"unknown loss {kind!r}: choose {' or '.join(LOSSES)}")
