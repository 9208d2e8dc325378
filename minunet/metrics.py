"""Dice and IoU for binary masks, per image and pooled over a set.

For one image with predicted mask P and true mask G (sets of pixels):

    Dice = 2 |P & G| / (|P| + |G|)        IoU = |P & G| / |P | G|

Empty-mask rule: when P and G are both empty the prediction is perfect, so
Dice = IoU = 1. When exactly one is empty, Dice = IoU = 0. This matters for
COVID-QU-Ex infection masks, which are empty for every non-COVID image.

Pooled scores sum the counts over all images first (one big image), so large
masks weigh more; the mean per-image score weighs every image the same.

Often-empty targets (infection masks: empty on every Normal and Non-COVID
image). Under the empty-mask rule a model that never predicts anything scores
about 0.5 on COVID-QU-Ex before it has learned anything, and painting lesions
on healthy lungs costs little. So two more figures, reported for every set:

    dice_nonempty   mean per-image Dice over the images whose reference mask
                    is not empty (n_nonempty of them); "predict nothing" gets 0
    fp_image_rate   share of the images with an empty reference mask on which
                    the prediction has any foreground pixel (an image-level
                    rate, not the pixel false-positive rate); "paint every
                    lung" gets 1

and the selection score of an infection run, ``dice_nonempty * (1 -
fp_image_rate)``, which neither trivial answer can win (both score 0), which
rewards finding lesions and keeping clean images clean alike, and which
reduces to dice_nonempty on a set with no empty reference. A figure over no
images is None (JSON null), never NaN.
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
        """dice, iou (mean per image), dice_pooled, iou_pooled, n_images, n_empty_masks,
        dice_nonempty, n_nonempty, fp_image_rate (see the module docstring); None where no image counts."""
        i, p, g = self.arrays()
        n = len(i)
        nonempty, empty = g > 0, g == 0
        return {
            "dice": float(dice_from_counts(i, p, g).mean()) if n else None,
            "iou": float(iou_from_counts(i, p, g).mean()) if n else None,
            "dice_pooled": float(dice_from_counts(i.sum(), p.sum(), g.sum())) if n else None,
            "iou_pooled": float(iou_from_counts(i.sum(), p.sum(), g.sum())) if n else None,
            "n_images": n,
            "n_empty_masks": int(empty.sum()),
            "dice_nonempty": float(dice_from_counts(i, p, g)[nonempty].mean()) if nonempty.any() else None,
            "n_nonempty": int(nonempty.sum()),
            "fp_image_rate": float((p[empty] > 0).mean()) if empty.any() else None,
        }


def selection_score(summary: dict, mask: str) -> float:
    """The validation figure that chooses best.npz: mean per-image Dice for lungs; for infection
    ``dice_nonempty * (1 - fp_image_rate)`` (each factor taken as 1 when the set has no image for it)."""
    if mask != "infection":
        return summary["dice"]
    dn, fp = summary["dice_nonempty"], summary["fp_image_rate"]
    return (1.0 if dn is None else dn) * (1.0 - (0.0 if fp is None else fp))
