"""Losses. Each returns (mean loss as a float, gradient w.r.t. the logits)."""

from __future__ import annotations

from minunet.kernels.numpy_ref import NumpyBackend

_REFERENCE = NumpyBackend("float64")


def bce_with_logits(logits, targets, backend=None):
    """Binary cross-entropy on raw logits, fused with the sigmoid.

    loss = mean(max(z,0) - z*y + log(1 + exp(-|z|)))   (stable for any z)
    dz   = (sigmoid(z) - y) / z.size

    logits, targets: NCHW arrays of the same shape. ``backend`` defaults to
    the NumPy reference (any float dtype); pass the model's backend to keep
    the work on its device.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} differ in shape")
    be = backend or _REFERENCE
    return be.sigmoid_bce(logits, targets)
