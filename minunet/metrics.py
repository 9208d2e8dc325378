"""Dice and IoU for binary masks, per image and pooled over a set.

For one image with predicted mask P and true mask G (sets of pixels):

    Dice = 2 |P & G| / (|P| + |G|)        IoU = |P & G| / |P | G|

Empty-mask rule: when P and G are both empty the prediction is perfect, so
Dice = IoU = 1. When exactly one is empty, Dice = IoU = 0. This matters for
COVID-QU-Ex infection masks, which are empty for every non-COVID image.

Pooled scores sum the counts over all images first (one big image), so large
masks weigh more; the mean per-image score weighs every image the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _as_batch(mask):
    m = np.asarray(mask).astype(bool)
    if m.ndim == 4:  # (N,1,H,W)
        m = m.reshape(m.shape[0], -1)
    elif m.ndim == 3:  # (N,H,W)
        m = m.reshape(m.shape[0], -1)
    elif m.ndim == 2:  # one (H,W) image
        m = m.reshape(1, -1)
    else:
        raise ValueError(f"expected a mask of 2, 3 or 4 dimensions, got shape {m.shape}")
    return m


def counts(pred, target):
    """Per-image (|P & G|, |P|, |G|) as three int64 arrays of length N."""
    p, g = _as_batch(pred), _as_batch(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and target {g.shape} differ in shape")
    return (p & g).sum(1, dtype=np.int64), p.sum(1, dtype=np.int64), g.sum(1, dtype=np.int64)


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den == 0, 1.0, num / np.maximum(den, 1))


def dice_from_counts(inter, psum, gsum):
    return _ratio(2 * np.asarray(inter), np.asarray(psum) + np.asarray(gsum))


def iou_from_counts(inter, psum, gsum):
    return _ratio(inter, np.asarray(psum) + np.asarray(gsum) - np.asarray(inter))


def dice_per_image(pred, target):
    """Dice of each image in a batch of binary masks ((N,H,W), (N,1,H,W) or one (H,W))."""
    return dice_from_counts(*counts(pred, target))


def iou_per_image(pred, target):
    """IoU of each image in a batch of binary masks."""
    return iou_from_counts(*counts(pred, target))


def dice_pooled(pred, target):
    """Dice over all pixels of all images together."""
    i, p, g = counts(pred, target)
    return float(dice_from_counts(i.sum(), p.sum(), g.sum()))


def iou_pooled(pred, target):
    """IoU over all pixels of all images together."""
    i, p, g = counts(pred, target)
    return float(iou_from_counts(i.sum(), p.sum(), g.sum()))


@dataclass
class ScoreAccumulator:
    """Collects per-image counts batch by batch; summarises at the end."""

    inter: list = field(default_factory=list)
    psum: list = field(default_factory=list)
    gsum: list = field(default_factory=list)

    def add(self, pred, target):
        i, p, g = counts(pred, target)
        self.inter.append(i)
        self.psum.append(p)
        self.gsum.append(g)

    def arrays(self):
        if not self.inter:
            return (np.zeros(0, np.int64),) * 3
        return tuple(np.concatenate(a) for a in (self.inter, self.psum, self.gsum))

    def per_image_dice(self):
        return dice_from_counts(*self.arrays())

    def per_image_iou(self):
        return iou_from_counts(*self.arrays())

    def summary(self):
        """dice, iou (mean per image), dice_pooled, iou_pooled, n_images, n_empty_masks."""
        i, p, g = self.arrays()
        n = len(i)
        return {
            "dice": float(dice_from_counts(i, p, g).mean()) if n else float("nan"),
            "iou": float(iou_from_counts(i, p, g).mean()) if n else float("nan"),
            "dice_pooled": float(dice_from_counts(i.sum(), p.sum(), g.sum())) if n else float("nan"),
            "iou_pooled": float(iou_from_counts(i.sum(), p.sum(), g.sum())) if n else float("nan"),
            "n_images": n,
            "n_empty_masks": int((g == 0).sum()),
        }
