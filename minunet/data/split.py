"""Choosing the training and validation images, and matching listed names to images.

``make_split`` uses the dataset's own val split when it has one, otherwise a
seeded fraction of each class (the same seed always gives the same split).
Names in lists (``--exclude``, split files, ``evaluate --only``) match an image
by a tail of its path (``name_matches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minunet.data.discover import DataIndex, Item
from minunet.errors import DataError


def read_name_list(path) -> set:
    """Names listed in a text file, one a line ('#' starts a comment): for --exclude."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the name list {path}: {e.strerror or e}") from None
    return {ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()}


def name_matches(item: Item, names: set) -> bool:
    """True when a listed name is the item's relative path, a tail of it, or class/file name
    (how --exclude, --split-file and evaluate --only match names to images)."""
    parts = item.name.split("/")
    tails = {"/".join(parts[i:]) for i in range(len(parts))}
    return bool(tails & names) or f"{item.group}/{parts[-1]}" in names


@dataclass
class Split:
    """The images a run trains and validates on, and where the validation set came from."""

    train: list
    val: list
    source: str  # "dataset val split" or "seeded val fraction 0.xx"
    excluded: int = 0

    def to_json(self, index: DataIndex) -> dict:
        return {
            "data_root": str(index.root),
            "layout": index.layout,
            "mask": index.mask,
            "val_source": self.source,
            "excluded": self.excluded,
            "train": [it.name for it in self.train],
            "val": [it.name for it in self.val],
        }


def make_split(index: DataIndex, val_fraction=0.1, seed=0, limit=None, exclude=None) -> Split:
    """Training and validation items.

    The dataset's own val split is used when it has one. Otherwise the train
    split (or every image, when the data is not split) is divided per class:
    a seeded ``val_fraction`` of each class goes to validation. ``limit`` keeps
    a seeded pick of that many images before the division (and at most
    ``limit`` of the dataset's val split); ``exclude`` drops listed names."""
    names = exclude or set()
    rng = np.random.default_rng([seed, 1])

    def keep(items):
        return [it for it in items if not name_matches(it, names)]

    def pick(items, n):
        if n is None or n >= len(items):
            return items
        idx = np.sort(rng.permutation(len(items))[:n])
        return [items[i] for i in idx]

    if "val" in index.splits and "train" in index.splits:
        pool, val = keep(index.splits["train"]), keep(index.splits["val"])
        excluded = len(index.splits["train"]) + len(index.splits["val"]) - len(pool) - len(val)
        pool = pick(pool, limit)
        val = pick(val, None if limit is None else max(1, int(round(limit * 0.2))))
        split = Split(pool, val, "dataset val split", excluded)
    else:
        base = index.splits.get("train") or index.items("all")
        pool = keep(base)
        excluded = len(base) - len(pool)
        pool = pick(pool, limit)
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        groups = {}
        for i, it in enumerate(pool):
            groups.setdefault(it.group, []).append(i)
        val_idx = []
        for g in sorted(groups):
            members = groups[g]
            n_val = int(round(len(members) * val_fraction))
            if len(members) >= 2:
                n_val = min(max(n_val, 1), len(members) - 1)
            else:
                n_val = 0
            perm = np.random.default_rng([seed, 2, len(val_idx)]).permutation(len(members))
            val_idx += [members[j] for j in perm[:n_val]]
        vset = set(val_idx)
        split = Split(
            [it for i, it in enumerate(pool) if i not in vset],
            [pool[i] for i in sorted(vset)],
            f"seeded val fraction {val_fraction:g}",
            excluded,
        )
    if not split.train:
        raise DataError(f"no training images left in {index.root} (after --limit/--exclude): use more data")
    if not split.val:
        raise DataError(f"no validation images in {index.root}: use more images or a larger --val-fraction")
    return split
