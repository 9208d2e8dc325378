"""How the lung model holds up when the X-ray is taken differently: mean Dice under seeded perturbations.

Each perturbation mimics an acquisition difference and is applied to the test images (the committed
split's test list by default) at the model's size, on [0, 1] images, then quantised back to 8 bits as a
file would be. Geometric ones (zoom out, rotation) move the mask with the image (nearest neighbour);
the others leave the mask alone.

    clean                 the image as it is
    gamma 0.6 / 1.6       x ** gamma
    contrast x0.7 / x1.3  mean + k (x - mean), clipped to [0, 1]
    equalise              global histogram equalisation (256 bins)
    blur 1.5 px           Gaussian, sigma 1.5 px (separable, reflected borders)
    noise 0.03            Gaussian noise, sigma 0.03, seeded per image
    down 128              bilinear down to 128 x 128 and back
    zoom out 85%          bilinear to 85% of the size, centred on black
    rotate -10 / +10      degrees, bilinear (mask: nearest), black corners
    text marker           a white block letter 20 px high in the top right corner

Also, on the clean images, the Dice by infection-extent band (the share of the lung that the reference
infection mask covers, COVID-19 images only), with the image count of each band.

    python benchmarks/robustness.py DATA [--model CKPT] [--subset test] [--view-shift PX] [--json out.json]

DATA: the COVID-QU-Ex "Infection Segmentation Data" folder (it has both lung and infection masks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from PIL import Image

from minunet.checkpoint import load_checkpoint
from minunet.cli.common import DEFAULT_MODEL
from minunet.data import default_cache_dir, filter_items, find_data, load_arrays
from minunet.kernels import get_backend
from minunet.metrics import ScoreAccumulator
from minunet.postprocess import drop_small
from minunet.quantify import BANDS
from minunet.views import view_probability


def _to_u8(x):
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def _resize(a, size, resample):
    mode = "F" if a.dtype != np.uint8 else "L"
    im = Image.fromarray(a.astype(np.float32) if mode == "F" else a, mode=mode)
    return np.asarray(im.resize((size, size) if np.isscalar(size) else size, resample))


def gaussian_blur(x, sigma):
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, r, mode="reflect")
    p = sum(k[i] * p[i : i + x.shape[0], :] for i in range(2 * r + 1))  # along rows
    return sum(k[i] * p[:, i : i + x.shape[1]] for i in range(2 * r + 1))  # then columns


def equalise(x):
    u8 = _to_u8(x)
    cdf = np.bincount(u8.ravel(), minlength=256).cumsum().astype(np.float64)
    cdf = (cdf - cdf.min()) / max(cdf.max() - cdf.min(), 1)
    return cdf[u8]


def zoom_out(a, share, resample):
    s = a.shape[0]
    n = int(round(s * share))
    small = _resize(a, n, resample)
    out = np.zeros_like(small, shape=a.shape)
    o = (s - n) // 2
    out[o : o + n, o : o + n] = small
    return out


def rotate(a, degrees, resample):
    mode = "L" if a.dtype == np.uint8 else "F"
    return np.asarray(Image.fromarray(a if mode == "L" else a.astype(np.float32), mode=mode)
                      .rotate(degrees, resample=resample, fillcolor=0))


def text_marker(x):
    """A block 'L' 20 px high, 12 wide, strokes 4 px, 8 px from the top right corner."""
    y = x.copy()
    s = x.shape[1]
    y[8:28, s - 20 : s - 16] = 1.0
    y[24:28, s - 20 : s - 8] = 1.0
    return y


def perturbations():
    """name -> f(x float (S,S) in [0,1], mask uint8 (S,S), rng) -> (x, mask)."""
    B, N = Image.BILINEAR, Image.NEAREST
    return {
        "clean": lambda x, m, r: (x, m),
        "gamma 0.6": lambda x, m, r: (x**0.6, m),
        "gamma 1.6": lambda x, m, r: (x**1.6, m),
        "contrast x0.7": lambda x, m, r: (np.clip(x.mean() + 0.7 * (x - x.mean()), 0, 1), m),
        "contrast x1.3": lambda x, m, r: (np.clip(x.mean() + 1.3 * (x - x.mean()), 0, 1), m),
        "equalise": lambda x, m, r: (equalise(x), m),
        "blur 1.5 px": lambda x, m, r: (gaussian_blur(x, 1.5), m),
        "noise 0.03": lambda x, m, r: (np.clip(x + r.normal(0, 0.03, x.shape), 0, 1), m),
        "down 128": lambda x, m, r: (_resize(_resize(x, 128, B), x.shape[0], B), m),
        "zoom out 85%": lambda x, m, r: (zoom_out(x, 0.85, B), zoom_out(m, 0.85, N)),
        "rotate -10": lambda x, m, r: (rotate(x, -10, B), rotate(m, -10, N)),
        "rotate +10": lambda x, m, r: (rotate(x, 10, B), rotate(m, 10, N)),
        "text marker": lambda x, m, r: (text_marker(x), m),
    }


def dice_under(model, images, masks, fn, seed=0, batch_size=8, threshold=0.5, min_area=0.0, view_shift=0):
    """Per-image Dice of the model on the perturbed images, after its post-processing (the probability of
    shifted views when ``view_shift`` > 0, sigmoid > threshold, components under ``min_area`` of the image
    dropped: what evaluate and predict do with the model)."""
    acc = ScoreAccumulator()
    for s in range(0, len(images), batch_size):
        xs, ms = [], []
        for i in range(s, min(s + batch_size, len(images))):
            x, m = fn(np.asarray(images[i], np.float64) / 255, np.asarray(masks[i]), np.random.default_rng([seed, i]))
            xs.append(_to_u8(x))
            ms.append(m)
        x = np.stack(xs).astype(np.float32)[:, None] / np.float32(255)
        pred = drop_small(view_probability(model, x, view_shift) > threshold, min_area)
        acc.add(pred, np.stack(ms)[:, None])
    return acc


def lung_and_lesion_arrays(data, size, only="covid-qu-ex", subset="test"):
    """(lung ArraySet, label, share, covid) for the listed images of a COVID-QU-Ex folder: the images
    with their lung masks, a label of the list, each image's infected share of the lung in percent
    (reference masks: 100 * infection pixels / lung pixels) and whether it is a COVID-19 image."""
    lung_items, label = filter_items(find_data(data, "lung").items("all"), only, subset)
    inf_items, _ = filter_items(find_data(data, "infection").items("all"), only, subset)
    lung = load_arrays(lung_items, size, default_cache_dir())
    inf = load_arrays(inf_items, size, default_cache_dir())
    lung_px = np.asarray(lung.masks).reshape(len(lung), -1).sum(1)
    share = 100 * np.asarray(inf.masks).reshape(len(inf), -1).sum(1) / np.maximum(lung_px, 1)
    return lung, label, share, np.array([g == "COVID-19" for g in lung.groups])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--only", default="covid-qu-ex")
    ap.add_argument("--subset", default="test", choices=["train", "val", "test"])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--json", default=None)
    ap.add_argument("--view-shift", type=int, default=None, help="shifted views (px; 0: off) [default: the model's]")
    a = ap.parse_args(argv)
    ck = load_checkpoint(a.model)
    model = ck.build_model(get_backend(a.backend))
    size = ck.input_size
    lung, label, share, covid = lung_and_lesion_arrays(a.data, size, a.only, a.subset)
    pp = ck.postprocess
    if a.view_shift is not None:
        pp["view_shift"] = a.view_shift
    print(f"{label}: {len(lung)} images at {size}x{size}; model {a.model} (threshold {pp['threshold']:g}, "
          f"min area {pp['min_area']:g}, shifted views {pp['view_shift']} px)")
    result = {"model": a.model, "images": label, "n": len(lung), "postprocess": pp, "perturbations": {}, "bands": []}
    clean = None
    for name, fn in perturbations().items():
        t0 = time.perf_counter()
        acc = dice_under(model, lung.images, lung.masks, fn, **pp)
        d = float(acc.per_image_dice().mean())
        clean = d if clean is None else clean
        result["perturbations"][name] = d
        print(f"{name:<14} Dice {d:.4f}  ({d - clean:+.4f})  {time.perf_counter() - t0:5.1f} s", flush=True)
        if name == "clean":
            dice = acc.per_image_dice()
            for lo, hi in BANDS:
                sel = covid & (share >= lo) & (share < hi)
                band = {"band": f"{lo}-{min(hi, 100)}%", "n": int(sel.sum()),
                        "dice": float(dice[sel].mean()) if sel.any() else None}
                result["bands"].append(band)
    print("lung Dice by infected share of the lung (reference masks, COVID-19 images):")
    for b in result["bands"]:
        print(f"  {b['band']:>8}  {b['n']:>4} images  Dice {'-' if b['dice'] is None else format(b['dice'], '.4f')}")
    worst = min((v - clean, k) for k, v in result["perturbations"].items())
    print(f"largest cost: {worst[1]} ({worst[0]:+.4f})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
