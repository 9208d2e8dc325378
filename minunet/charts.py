"""``curves.png`` of a run folder: loss and validation scores per epoch, drawn with Pillow (no matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from minunet.atomicfile import atomic_write


def draw_curves(path: Path, rows):
    """Two panels, drawn with Pillow: loss (train, val) per epoch on an axis fitted to it, and Dice/IoU
    (val) on a fixed 0-1 axis, so that a run's scores read the same at every epoch and across runs."""
    W, H, pad = 980, 400, 56
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    epochs = [r["epoch"] for r in rows]
    panels = [  # (title, series, fixed y range or None)
        ("loss", [("train loss", "train_loss", (31, 119, 180)), ("val loss", "val_loss", (255, 127, 14))], None),
        ("validation score", [("val Dice", "val_dice", (44, 160, 44)), ("val IoU", "val_iou", (148, 103, 189))],
         (0.0, 1.0)),
    ]
    pw = W // 2
    for k, (title, series, fixed) in enumerate(panels):
        x0, x1, y0, y1 = k * pw + pad, (k + 1) * pw - 20, 34, H - 44
        vals = [r[key] for _, key, _ in series for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if fixed:
            lo, hi = fixed
        else:
            lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            span = hi - lo
            lo, hi = lo - 0.05 * span, hi + 0.05 * span
        e0, e1 = (min(epochs), max(epochs)) if epochs else (1, 1)
        if e1 == e0:
            e0, e1 = e0 - 1, e1 + 1

        def px(e, v, x0=x0, x1=x1, y0=y0, y1=y1, lo=lo, hi=hi, e0=e0, e1=e1):
            return x0 + (e - e0) / (e1 - e0) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, 10), title, fill=(0, 0, 0), font=font)
        for t in range(5):  # y ticks and grid
            v = lo + (hi - lo) * t / 4
            _, yy = px(e0, v)
            d.line([x0, yy, x1, yy], fill=(225, 225, 225))
            d.text((x0 - 50, yy - 6), f"{v:.3f}", fill=(0, 0, 0), font=font)
        step = max(1, len(epochs) // 10)
        for e in epochs[::step]:
            xx, _ = px(e, lo)
            d.line([xx, y1, xx, y1 + 4], fill=(0, 0, 0))
            d.text((xx - 4, y1 + 8), str(e), fill=(0, 0, 0), font=font)
        d.text(((x0 + x1) // 2 - 14, y1 + 22), "epoch", fill=(0, 0, 0), font=font)
        for j, (label, key, color) in enumerate(series):
            pts = [px(r["epoch"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            lx = x1 - 110  # legend: top right for the falling losses, bottom right for the rising scores
            ly = (y0 + 8 if k == 0 else y1 - 8 - 16 * len(series)) + 16 * j
            d.line([lx, ly + 6, lx + 18, ly + 6], fill=color, width=3)
            d.text((lx + 24, ly), label, fill=(0, 0, 0), font=font)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
