"""The run folder (``--out``) that ``minunet train`` writes and ``--resume`` reads:

    config.json   every setting (under "train"), plus what was found (backend, data, split sizes)
    split.json    the training and validation file lists (the held-out set)
    history.csv   one row per epoch: losses, val Dice/IoU, lr, seconds, images/s
    curves.png    loss and Dice per epoch (charts.draw_curves)
    last.npz      weights + Adam + position, every epoch and on Ctrl-C (resumable; checkpoint.py)
    best.npz      the same, at the epoch with the best validation score (metrics.selection_score:
                  mean Dice for lungs, dice_nonempty * (1 - fp_image_rate) for infection)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from minunet.errors import ConfigError

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_dice_pooled", "val_dice_nonempty",
                  "val_fp_image_rate", "val_score", "lr", "seconds", "images_per_s")


def write_run_info(out: Path, run_info: dict, split_json: dict):
    """config.json (the settings and what was found) and split.json (the file lists)."""
    (out / "config.json").write_text(json.dumps(run_info, indent=2) + "\n")
    (out / "split.json").write_text(json.dumps(split_json, indent=1) + "\n")


def load_run_config(out) -> dict:
    """The settings saved in a run folder's config.json (for --resume)."""
    path = Path(out) / "config.json"
    if not (Path(out) / "last.npz").is_file():
        raise ConfigError(f"there is no run to resume in {out} (no last.npz): start one without --resume")
    try:
        return json.loads(path.read_text())["train"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path} is missing or damaged: cannot resume; start a new run with another --out") from None


def load_run_split(out: Path) -> dict | None:
    """The run's split.json, or None when it is missing or damaged."""
    try:
        return json.loads((out / "split.json").read_text())
    except (OSError, ValueError):
        return None


def write_history(path: Path, rows):
    """history.csv: one row per epoch, the HISTORY_FIELDS columns (written to a temporary file, then renamed)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in HISTORY_FIELDS})
    tmp.replace(path)
