"""Losses. Each returns (loss as a float, gradient w.r.t. the logits); the loss is a mean over the
batch (BCE: per pixel, optionally weighted; soft Dice and the image-level term: per image).

All take NCHW logits z and targets y of the same shape; ``backend`` defaults
to the NumPy reference (any float dtype). Pass the model's backend to keep
the work on its device. With ``on_device=True`` the loss is not turned into a Python float (which
would wait for a GPU to finish the step): it stays a float64 value of the backend's ``xp`` (a 0-d
array on a GPU; NumPy turns 0-d arithmetic into a numpy scalar), read later with ``float()``.
"""

from __future__ import annotations

from minunet.kernels.numpy_ref import NumpyBackend

_REFERENCE = NumpyBackend("float64")

LOSSES = ("bce", "bce+dice", "bce+dice+image")
# The weight of the image-level term in "bce+dice+image": the one weight measured (README, the lesion model's card).
IMAGE_TERM_WEIGHT = 0.5


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


def image_bce_with_logits(logits, targets, backend=None, on_device=False):
    """An image-level term: does image n hold any foreground? Its logit s_n is the log-mean-exp of the
    image's pixel logits (a smooth maximum: large when some pixels are sure), scored by BCE against
    h_n = 1 when y_n has a foreground pixel, else 0. The mean over the N images of the batch.

    Per image n of P pixels, m_n = max_i z_ni (subtracted so that exp never overflows):
        s_n  = log((1/P) sum_i exp(z_ni)) = m_n + log((1/P) sum_i exp(z_ni - m_n))
        loss = (1/N) sum_n [max(s_n, 0) - s_n h_n + log(1 + exp(-|s_n|))]
        ds_n / dz_ni = softmax(z_n)_i = exp(z_ni - m_n) / sum_j exp(z_nj - m_n)
        dz_ni = (1/N) (sigmoid(s_n) - h_n) softmax(z_n)_i
    Why: the pixel losses weigh a lesion by its pixels, so a model can miss a whole faint lesion, or
    paint a few specks on a healthy lung, at little cost; the image's own yes/no is what ``fp_image_rate``
    and the missed images of ``dice_nonempty`` count. The gradient goes to the pixels the model is
    surest of (softmax), pushing them up on an image with a lesion and down on one without.
    ``on_device``: the loss as a float64 value of the backend's ``xp``, not a float (see above)."""
    _check(logits, targets)
    be = backend or _REFERENCE
    xp = be.xp
    n = logits.shape[0]
    z = logits.reshape(n, -1)
    has = (targets.reshape(n, -1) > 0).any(axis=1).astype(xp.float64)
    top = z.max(axis=1, keepdims=True)
    e = xp.exp(z - top)
    total = e.sum(axis=1, keepdims=True)
    s = (top + xp.log(total / z.shape[1]))[:, 0].astype(xp.float64)
    per_image = xp.maximum(s, 0) - s * has + xp.log1p(xp.exp(-xp.abs(s)))
    mean = per_image.mean()
    loss = mean if on_device else float(mean)
    sig = 0.5 * (1 + xp.tanh(s / 2))  # sigmoid(s) without overflow for any s
    g = ((sig - has) / n).astype(logits.dtype)
    dz = (g[:, None] * (e / total)).reshape(logits.shape).astype(logits.dtype, copy=False)
    return loss, dz


def loss_and_grad(kind, logits, targets, backend=None, weights=None, on_device=False):
    """The training loss by name: 'bce', 'bce+dice' (their sum) or 'bce+dice+image' (plus IMAGE_TERM_WEIGHT
    times ``image_bce_with_logits``). ``weights`` (None: every pixel 1) weigh the BCE term per pixel
    (``bce_with_logits``); the other terms are unweighted. ``on_device``: the loss as a float64 value of the
    backend's ``xp`` (a GPU need not finish the step before it returns)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose {' or '.join(LOSSES)}")
    loss, dz = bce_with_logits(logits, targets, backend, weights, on_device)
    if kind in ("bce+dice", "bce+dice+image"):
        l2, d2 = soft_dice_with_logits(logits, targets, backend, on_device=on_device)
        loss = loss + l2
        dz += d2
    if kind == "bce+dice+image":
        l3, d3 = image_bce_with_logits(logits, targets, backend, on_device)
        loss = loss + IMAGE_TERM_WEIGHT * l3
        d3 *= IMAGE_TERM_WEIGHT
        dz += d3
    return loss, dz
