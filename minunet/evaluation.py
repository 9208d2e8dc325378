"""Scoring a model on a set of images: Dice and IoU overall, per class and per image.

Training's validation (every epoch) and ``minunet evaluate`` both call
``evaluate_model``, so a run's val Dice and a later evaluate of the same
checkpoint on the same images agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minunet.data import ArraySet, iter_eval_batches
from minunet.errors import ConfigError
from minunet.metrics import ScoreAccumulator, iou_from_counts
from minunet.postprocess import drop_small, keep_largest
from minunet.views import view_probability

THRESHOLD = 0.5  # a pixel is foreground when sigmoid(logit) > THRESHOLD


PER_IMAGE_COLUMNS = ("image", "class", "dice", "iou", "pred_px", "ref_px")


@dataclass
class EvalResult:
    """Scores over a set of images: overall, per class, and per image."""

    summary: dict  # ScoreAccumulator.summary() plus "loss" (mean BCE)
    per_group: dict  # class name -> summary
    dice_per_image: np.ndarray
    names: list
    groups: list  # each image's class ("" for data without classes)
    counts: tuple  # per image (|P & G|, |P|, |G|): int64 arrays, as metrics.counts gives them
    batch_losses: list  # each batch's summed BCE (mean x images), in order: shards' losses merge exactly

    def to_json(self) -> dict:
        out = dict(self.summary)
        out["per_class"] = self.per_group
        return out

    def per_image_rows(self) -> list:
        """One dict per image with the PER_IMAGE_COLUMNS (pixel counts at the size it was scored at)."""
        inter, psum, gsum = self.counts
        iou = iou_from_counts(inter, psum, gsum)
        return [dict(zip(PER_IMAGE_COLUMNS, (name, group, float(d), float(j), int(p), int(g)), strict=True))
                for name, group, d, j, p, g in zip(self.names, self.groups, self.dice_per_image, iou, psum, gsum,
                                                   strict=True)]


def evaluate_model(model, data: ArraySet, batch_size: int, threshold: float = THRESHOLD, progress=None,
                   keep_largest_k: int = 0, min_area: float = 0.0, each_probability=None,
                   view_shift: int = 0) -> EvalResult:
    """Mean per-image and pooled Dice/IoU of ``model`` on every image of ``data``.

    The prediction is sigmoid(logits) > threshold, without its components smaller
    than ``min_area`` of the image (``postprocess.drop_small``), then (when
    ``keep_largest_k`` > 0) only its k largest connected components. With ``view_shift`` > 0 the
    probability is that of shifted views (``minunet.views``); the loss is the image's own. Training's
    validation (the image alone) and
    ``minunet evaluate`` both call this, with the model's inference forward.
    ``each_probability(i, prob)``, when given, receives each image's (H, W) float32 probability map."""
    if data.masks is None:
        raise ConfigError("these images have no masks, so they cannot be scored")
    be = model.backend
    overall, groups = ScoreAccumulator(), {}
    batch_losses = []
    for start, x, y in iter_eval_batches(data, batch_size):
        logits = model.forward(be.asarray(x), train=False)
        loss, _ = be.sigmoid_bce(logits, be.asarray(y))
        batch_losses.append(loss * len(x))
        prob = np.asarray(be.to_host(be.sigmoid(logits)))
        if view_shift:
            prob = view_probability(model, x, view_shift, prob)
        pred = drop_small(prob > threshold, min_area)
        if keep_largest_k > 0:
            pred = keep_largest(pred, keep_largest_k)
        overall.add(pred, y)
        for k in range(len(x)):
            g = data.groups[start + k] or "all"
            groups.setdefault(g, ScoreAccumulator()).add(pred[k : k + 1], y[k : k + 1])
            if each_probability is not None:
                each_probability(start + k, prob[k, 0])
        if progress is not None:
            progress("validate", done=start + len(x), total=len(data))
    summary = overall.summary()
    summary["loss"] = mean_loss(batch_losses, len(data))
    return EvalResult(summary, {g: a.summary() for g, a in sorted(groups.items())}, overall.per_image_dice(),
                      list(data.names), list(data.groups), overall.arrays(), batch_losses)


def mean_loss(batch_losses: list, n: int) -> float:
    """The mean BCE per image of n images from their batches' summed losses, added in batch order (so the
    batches of consecutive shards give one evaluation's value to the last bit)."""
    total = 0.0
    for b in batch_losses:
        total += b
    return total / max(n, 1)
