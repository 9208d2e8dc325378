"""Inference on whole X-rays: resize to the model's size, forward, sigmoid, back to each image's own size.

``predict`` and ``quantify`` both segment through ``probabilities``, with the
model's inference forward (``forward(x, train=False)``): nothing is kept for a
backward pass, so memory grows with the batch by the activations of one layer
and the skips, not by the whole network's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from minunet.data import resize_gray
from minunet.views import view_probability


def probabilities(model, grays, size: int, batch_size: int = 8, view_shift: int = 0):
    """Yield, for each (H, W) uint8 image in ``grays``, its float32 (H, W) foreground probability.

    Each image is resized (bilinear) to ``size`` x ``size`` and scaled by 1/255; with ``view_shift`` > 0
    the probability is that of shifted views (``minunet.views``) at that size; the probability map is
    resized back to the image's own size, bilinear."""
    grays = list(grays)
    for start in range(0, len(grays), batch_size):
        chunk = grays[start : start + batch_size]
        x = np.stack([resize_gray(g, size) for g in chunk]).astype(np.float32)[:, None] / np.float32(255)
        prob = view_probability(model, x, view_shift)[:, 0]
        for g, p in zip(chunk, prob, strict=True):
            h, w = g.shape
            if (h, w) != p.shape:
                p = np.asarray(Image.fromarray(p, mode="F").resize((w, h), Image.BILINEAR))
            yield p


def to_8bit(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as uint8 for a PNG: 255 is probability 1 (rounded to the nearest level)."""
    return np.rint(np.clip(prob.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
