"""Tiny synthetic datasets on disk for the data, train and CLI tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("COVID-19", "Non-COVID", "Normal")


def xray(rng, h=40, w=40):
    """A grayscale 'X-ray' with two bright ellipses ('lungs') and its 0/255 mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for cx in (w * 0.3, w * 0.7):
        cx += rng.uniform(-2, 2)
        cy = h * 0.5 + rng.uniform(-2, 2)
        mask |= ((xx - cx) / (w * 0.16)) ** 2 + ((yy - cy) / (h * 0.3)) ** 2 <= 1
    img = rng.uniform(20, 90, (h, w)) + 120 * mask
    return np.clip(img, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def save(path: Path, a: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def make_qu(root: Path, n_per_class=4, splits=("Train",), seed=0, h=40, w=40, infection=True):
    """COVID-QU-Ex layout: root/Infection Segmentation Data/<split>/<class>/{images,lung masks,infection masks}."""
    rng = np.random.default_rng(seed)
    part = root / "Infection Segmentation Data"
    for split in splits:
        for c in CLASSES:
            for i in range(n_per_class):
                name = f"{c.replace('-', '_')} ({split} {i}).png"
                img, m = xray(rng, h, w)
                save(part / split / c / "images" / name, img)
                save(part / split / c / "lung masks" / name, m)
                if infection:
                    inf = np.zeros_like(m) if c != "COVID-19" else (m * (np.arange(w) < w // 2)).astype(np.uint8)
                    save(part / split / c / "infection masks" / name, inf)
    return part


def make_generic(root: Path, n=6, seed=0, h=40, w=40, zero_one=False, mask_suffix=""):
    """Generic layout: root/images/*.png and root/masks/<stem><mask_suffix>.png."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, m = xray(rng, h, w)
        save(root / "images" / f"img {i}.png", img)
        save(root / "masks" / f"img {i}{mask_suffix}.png", (m > 0).astype(np.uint8) if zero_one else m)
    return root
