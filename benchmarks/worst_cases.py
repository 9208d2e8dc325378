"""The lung model's worst held-out cases, before and after a retraining: one figure, one row per image.

Scores the "before" model on the test images of the committed split (COVID-19 images in one band of
infected share of the lung, 75-100% by default: the severe cases a lung model tends to cut short),
takes its N worst by Dice, and draws for each: the reference lung mask, the before model's and the
after model's predictions (tinted, outlined in yellow), with each Dice in the panel's title bar.

    python benchmarks/worst_cases.py DATA --before OLD.npz --after NEW.npz --out worst.png [--n 3]

DATA: the COVID-QU-Ex "Infection Segmentation Data" folder (lung and infection masks).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image, ImageDraw
from robustness import lung_and_lesion_arrays  # benchmarks/robustness.py, beside this script

from minunet.checkpoint import load_checkpoint
from minunet.kernels import get_backend
from minunet.metrics import ScoreAccumulator
from minunet.postprocess import drop_small, overlay
from minunet.views import view_probability


def predict_masks(ck, images, backend, batch_size=8):
    """bool (N, S, S): the checkpoint's lung masks after its own post-processing, as evaluate scores them."""
    model, pp = ck.build_model(backend), ck.postprocess
    out = []
    for s in range(0, len(images), batch_size):
        x = np.asarray(images[s : s + batch_size], np.float32)[:, None] / np.float32(255)
        prob = view_probability(model, x, pp["view_shift"])
        out.append(drop_small(prob[:, 0] > pp["threshold"], pp["min_area"]))
    return np.concatenate(out) if out else np.zeros((0,) + tuple(images.shape[1:]), bool)


def per_image_dice(pred, ref) -> np.ndarray:
    acc = ScoreAccumulator()
    acc.add(pred[:, None], ref[:, None])
    return acc.per_image_dice()


def panel(gray, mask, title, color):
    """RGB uint8 (S + 18, S, 3): the overlay under a title bar."""
    img = overlay(gray, mask, color=color)
    bar = Image.new("RGB", (img.shape[1], 18), (0, 0, 0))
    ImageDraw.Draw(bar).text((4, 3), title, fill=(255, 255, 255))
    return np.concatenate([np.asarray(bar), img], axis=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--before", required=True, help="the model before (e.g. the shipped lung model of an older tag)")
    ap.add_argument("--after", required=True)
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--band", type=float, nargs=2, default=(75, 101), metavar=("LO", "HI"),
                    help="infected share of the lung, in percent [default: 75 101, i.e. 75-100%%]")
    ap.add_argument("--only", default="covid-qu-ex")
    ap.add_argument("--subset", default="test", choices=["train", "val", "test"])
    ap.add_argument("--backend", default="numba")
    a = ap.parse_args(argv)

    before, after = load_checkpoint(a.before), load_checkpoint(a.after)
    size = before.input_size
    if after.input_size != size:
        ap.error(f"the models take different sizes ({size} and {after.input_size})")
    lung, label, share, covid = lung_and_lesion_arrays(a.data, size, a.only, a.subset)
    sel = np.flatnonzero(covid & (share >= a.band[0]) & (share < a.band[1]))
    if not len(sel):
        ap.error(f"no COVID-19 image of {label} has an infected share in [{a.band[0]}, {a.band[1]})")
    images, ref = np.asarray(lung.images)[sel], np.asarray(lung.masks)[sel].astype(bool)
    be = get_backend(a.backend)
    p_all = predict_masks(before, images, be)
    d_before = per_image_dice(p_all, ref)
    worst = np.argsort(d_before, kind="stable")[: a.n]
    p_before = p_all[worst]
    p_after = predict_masks(after, images[worst], be)
    d_after = per_image_dice(p_after, ref[worst])
    rows = []
    print(f"{label}: {len(sel)} COVID-19 images with {a.band[0]:g}-{min(a.band[1], 100):g}% of the lung infected; "
          f"the {len(worst)} worst of the before model:")
    for k, i in enumerate(worst):
        name = lung.names[sel[i]].rsplit("/", 1)[-1]
        print(f"  {name}: infected {share[sel[i]]:.0f}%  Dice before {d_before[i]:.4f}  after {d_after[k]:.4f}")
        rows.append(np.concatenate([
            panel(images[i], ref[i], f"reference ({share[sel[i]]:.0f}% infected)", (40, 200, 40)),
            panel(images[i], p_before[k], f"before: Dice {d_before[i]:.3f}", (255, 40, 40)),
            panel(images[i], p_after[k], f"after: Dice {d_after[k]:.3f}", (40, 120, 255)),
        ], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
