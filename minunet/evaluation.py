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
from minunet.metrics import ScoreAccumulator
from minunet.postprocess import drop_small, keep_largest

THRESHOLD = 0.5  # a pixel is foreground when sigmoid(logit) > THRESHOLD


@dataclass
class EvalResult:
    """Scores over a set of images: overall, per class, and per image."""

    summary: dict  # ScoreAccumulator.summary() plus "loss" (mean BCE)
    per_group: dict  # class name -> summary
    dice_per_image: np.ndarray
    names: list
    groups: list  # each image's class ("" for data without classes)
    counts: tuple  # per image (|P & G|, |P|, |G|): int64 arrays, as metrics.counts gives them

    def to_json(self) -> dict:
        out = dict(self.summary)
        out["per_class"] = self.per_group
        return out


def evaluate_model(model, data: ArraySet, batch_size: int, threshold: float = THRESHOLD, progress=None,
                   keep_largest_k: int = 0, min_area: float = 0.0) -> EvalResult:
    """Mean per-image and pooled Dice/IoU of ``model`` on every image of ``data``.

    The prediction is sigmoid(logits) > threshold, without its components smaller
    than ``min_area`` of the image (``postprocess.drop_small``), then (when
    ``keep_largest_k`` > 0) only its k largest connected components. Training's validation and
    ``minunet evaluate`` both call this."""
    if data.masks is None:
        raise ConfigError("these images have no masks, so they cannot be scored")
    be = model.backend
    overall, groups = ScoreAccumulator(), {}
    loss_sum = 0.0
    for start, x, y in iter_eval_batches(data, batch_size):
        logits = model.forward(be.asarray(x))
        loss, _ = be.sigmoid_bce(logits, be.asarray(y))
        loss_sum += loss * len(x)
        pred = drop_small(np.asarray(be.to_host(be.sigmoid(logits))) > threshold, min_area)
        if keep_largest_k > 0:
            pred = keep_largest(pred, keep_largest_k)
        overall.add(pred, y)
        for k in range(len(x)):
            g = data.groups[start + k] or "all"
            groups.setdefault(g, ScoreAccumulator()).add(pred[k : k + 1], y[k : k + 1])
        if progress is not None:
            progress("validate", done=start + len(x), total=len(data))
    summary = overall.summary()
    summary["loss"] = loss_sum / max(len(data), 1)
    return EvalResult(summary, {g: a.summary() for g, a in sorted(groups.items())}, overall.per_image_dice(),
                      list(data.names), list(data.groups), overall.arrays())
