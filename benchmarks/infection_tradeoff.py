"""The lesion model's trade-off: dice_nonempty against fp_image_rate as the threshold and the minimum
lesion area vary (the model card's table, and how the shipped post-processing was chosen).

Run the model once over a list of images (default: the val list of the committed split, which chooses
the settings; pass ``--subset test`` only for the final figures), then score every combination of
``--thresholds`` and ``--min-areas`` (a component smaller than that share of the image is dropped,
``postprocess.drop_small``). Prints one row per combination, overall and for Normal and Non-COVID,
and the best setting under the fp_image_rate bound.

``--bands`` adds where ``dice_nonempty`` is lost, at the model's own post-processing: the images
with lesions by the share of the reference lung their reference lesion covers (``quantify.BANDS``),
each band's mean Dice, the Dice of painting the whole reference lung, and the mean predicted and
reference shares of the lung.

    python benchmarks/infection_tradeoff.py DATA --model runs/inf/best.npz [--subset val] [--view-shift PX]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from minunet.checkpoint import load_checkpoint
from minunet.data import default_cache_dir, filter_items, find_data, load_arrays
from minunet.evaluation import evaluate_model
from minunet.kernels import get_backend
from minunet.metrics import ScoreAccumulator, dice_per_image, selection_score
from minunet.postprocess import drop_small
from minunet.quantify import BANDS


def probabilities(model, arrays, batch_size=8, view_shift=0):
    """(N, S, S) float32 foreground probabilities at the model's input size (one evaluate_model pass; shifted
    views when ``view_shift`` > 0)."""
    out = np.empty(arrays.images.shape, np.float32)
    evaluate_model(model, arrays, batch_size, each_probability=lambda i, p: out.__setitem__(i, p),
                   view_shift=view_shift)
    return out


def score(prob, masks, groups, threshold, min_area):
    pred = drop_small(prob > threshold, min_area)
    overall, per = ScoreAccumulator(), {}
    overall.add(pred, masks)
    for g in sorted(set(groups)):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        per.setdefault(g, ScoreAccumulator()).add(pred[idx], masks[idx])
    return overall.summary(), {g: a.summary() for g, a in per.items()}


def band_rows(pred, masks, lungs):
    """Per band of reference infected share (percent of the reference lung), over the images with a
    lesion: n, mean Dice of ``pred``, mean Dice of the whole reference lung as the prediction, and
    the mean predicted and reference lesion shares of the reference lung (percent)."""
    n = len(masks)
    lung_px = np.maximum(lungs.reshape(n, -1).sum(1), 1)
    ref_share = 100 * masks.reshape(n, -1).sum(1) / lung_px
    pred_share = 100 * pred.reshape(n, -1).sum(1) / lung_px
    has = masks.reshape(n, -1).any(1)
    dice, paint = dice_per_image(pred, masks), dice_per_image(lungs, masks)
    rows = []
    for lo, hi in BANDS:
        sel = has & (ref_share >= lo) & (ref_share < hi)
        means = [float(a[sel].mean()) if sel.any() else None for a in (dice, paint, pred_share, ref_share)]
        rows.append({"band": f"{lo}-{min(hi, 100)}%", "n": int(sel.sum()),
                     **dict(zip(("dice", "dice_paint_lung", "pred_share", "ref_share"), means, strict=True))})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--model", required=True)
    ap.add_argument("--only", default="covid-qu-ex")
    ap.add_argument("--subset", default="val", choices=["train", "val", "test"])
    ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--min-areas", default="0,0.005,0.01,0.02,0.04,0.08")
    ap.add_argument("--fp-bound", type=float, default=0.15)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bands", action="store_true", help="also the Dice per band of infected share")
    ap.add_argument("--view-shift", type=int, default=None, help="shifted views (px; 0: off) [default: the model's]")
    a = ap.parse_args(argv)
    ck = load_checkpoint(a.model)
    model = ck.build_model(get_backend(a.backend))
    size = ck.input_size
    index = find_data(a.data, "infection")
    items, label = filter_items(index.items("all"), a.only, a.subset)
    arrays = load_arrays(items, size, default_cache_dir())
    view_shift = ck.postprocess["view_shift"] if a.view_shift is None else a.view_shift
    prob = probabilities(model, arrays, view_shift=view_shift)
    masks = np.asarray(arrays.masks).astype(bool)
    rows = []
    print(f"{label}: {len(items)} images at {size}x{size}; model {a.model}"
          + (f"; shifted views {view_shift} px" if view_shift else ""))
    print(f"{'thr':>5} {'min area':>8} {'Dice-ne':>8} {'pooled':>7} {'FP-img':>7} {'FP Normal':>9} "
          f"{'FP Non-COVID':>12} {'score':>6}")
    for t in (float(v) for v in a.thresholds.split(",")):
        for m in (float(v) for v in a.min_areas.split(",")):
            s, per = score(prob, masks, arrays.groups, t, m)
            row = {"threshold": t, "min_area": m, "dice_nonempty": s["dice_nonempty"], "dice_pooled": s["dice_pooled"],
                   "fp_image_rate": s["fp_image_rate"], "score": selection_score(s, "infection"),
                   "fp_normal": per.get("Normal", {}).get("fp_image_rate"),
                   "fp_non_covid": per.get("Non-COVID", {}).get("fp_image_rate"),
                   "dice_nonempty_covid": per.get("COVID-19", {}).get("dice_nonempty")}
            rows.append(row)
            print(f"{t:>5.2f} {m:>8.3f} {row['dice_nonempty']:>8.4f} {row['dice_pooled']:>7.4f} "
                  f"{row['fp_image_rate']:>7.3f} {row['fp_normal'] or 0:>9.3f} {row['fp_non_covid'] or 0:>12.3f} "
                  f"{row['score']:>6.4f}")
    ok = [r for r in rows if r["fp_image_rate"] <= a.fp_bound]
    best = max(ok or rows, key=lambda r: r["dice_nonempty"] if ok else r["score"])
    print(f"best {'under fp_image_rate <= ' + str(a.fp_bound) if ok else 'score (no setting meets the bound)'}: "
          f"threshold {best['threshold']}, min area {best['min_area']}: dice_nonempty {best['dice_nonempty']:.4f}, "
          f"fp_image_rate {best['fp_image_rate']:.3f}")
    out = {"subset": label, "model": a.model, "rows": rows, "best": best}
    if a.bands:
        lung_items, _ = filter_items(find_data(a.data, "lung").items("all"), a.only, a.subset)
        if [i.image for i in lung_items] != [i.image for i in items]:
            raise SystemExit("the lung masks' image list differs from the infection masks' one")
        lungs = np.asarray(load_arrays(lung_items, size, default_cache_dir()).masks).astype(bool)
        pp = ck.postprocess
        out["bands"] = band_rows(drop_small(prob > pp["threshold"], pp["min_area"]), masks, lungs)
        print(f"COVID-19 images by infected share of the reference lung (threshold {pp['threshold']}, "
              f"min area {pp['min_area']}):")
        print(f"{'band':>8} {'images':>6} {'Dice':>6} {'paint lung':>10} {'pred share':>10} {'ref share':>9}")
        for r in out["bands"]:
            if r["n"]:
                print(f"{r['band']:>8} {r['n']:>6} {r['dice']:>6.3f} {r['dice_paint_lung']:>10.3f} "
                      f"{r['pred_share']:>9.0f}% {r['ref_share']:>8.0f}%")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
