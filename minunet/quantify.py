"""How much of each lung is affected: lung and lesion masks -> percentages and an extent score.

Research and teaching only, not for diagnosis. For one frontal chest X-ray
with a lung mask L and a lesion (infection) mask I, both (H, W) booleans:

    lung_px           |L|
    infection_px      |I & L|          (lesions are counted only inside the lung)
    infected_percent  100 * infection_px / lung_px

Right and left. In a frontal X-ray shown the radiological way the patient
faces the viewer, so **the patient's right lung is on the image's left**. The
lung mask is cut by a vertical line: midway between the centroids of its two
largest connected components, or the image centre when it has only one (a
consolidated lung often breaks into pieces, so the pieces are not assigned one
by one). Columns left of the line (x < line) are the right lung.

    right_lung_percent  100 * |I & L & right| / |L & right|   (likewise left)
    *_extent            0 if p = 0, 1 if 0 < p < 25, 2 if 25 <= p < 50,
                        3 if 50 <= p < 75, 4 if p >= 75
    severity_score      right_extent + left_extent (0-8)

The extent score follows the one used for COVID-19 chest radiographs (Wong et
al., Radiology 2020, adapted from Warren et al.'s RALE score, Thorax 2018),
but it is derived from masks, not read by a radiologist. An image without lung
pixels gets None everywhere (empty CSV cells); a side without lung pixels gets
None for that side and for the severity score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minunet.postprocess import label_components

BANDS = ((0, 25), (25, 50), (50, 75), (75, 101))  # infected share of the reference lung, percent; 100 is in the last
COLUMNS = ("lung_px", "infection_px", "infected_percent", "right_lung_percent", "left_lung_percent",
           "right_extent", "left_extent", "severity_score")


@dataclass
class LungDamage:
    """The figures of one image (see the module docstring); None where they cannot be computed."""

    lung_px: int
    infection_px: int
    infected_percent: float | None
    right_lung_percent: float | None
    left_lung_percent: float | None
    right_extent: int | None
    left_extent: int | None
    severity_score: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def extent(percent: float | None) -> int | None:
    """The 0-4 extent of one lung from its infected share in percent."""
    if percent is None:
        return None
    if percent <= 0:
        return 0
    return 1 + min(int(percent // 25), 3)


def split_column(lung: np.ndarray) -> float:
    """The x of the vertical line between the right lung (x < line, image left) and the left lung."""
    labels, sizes = label_components(lung)
    if len(sizes) < 2:
        return (lung.shape[1] - 1) / 2
    a, b = np.argsort(-sizes, kind="stable")[:2] + 1
    cols = np.nonzero(labels)[1]
    lab = labels[labels > 0]
    return (cols[lab == a].mean() + cols[lab == b].mean()) / 2


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def lung_damage(lung, infection) -> LungDamage:
    """The figures of one image from its (H, W) lung and lesion masks."""
    lung, infection = np.asarray(lung).astype(bool), np.asarray(infection).astype(bool)
    if lung.shape != infection.shape or lung.ndim != 2:
        raise ValueError(f"lung {lung.shape} and infection {infection.shape} masks must be one (H, W) each")
    inside = infection & lung
    lung_px, infection_px = int(lung.sum()), int(inside.sum())
    if lung_px == 0:
        return LungDamage(0, 0, None, None, None, None, None, None)
    right = np.arange(lung.shape[1])[None, :] < split_column(lung)  # the patient's right: the image's left
    p_right = _percent(int((inside & right).sum()), int((lung & right).sum()))
    p_left = _percent(int((inside & ~right).sum()), int((lung & ~right).sum()))
    e_right, e_left = extent(p_right), extent(p_left)
    severity = None if e_right is None or e_left is None else e_right + e_left
    return LungDamage(lung_px, infection_px, _percent(infection_px, lung_px), p_right, p_left, e_right, e_left,
                      severity)


def summarise(rows: list[dict], refs: list[dict | None] | None = None) -> dict:
    """summary.json: n_images, n_no_lung, mean_infected_percent, severity_histogram (9 counts, scores 0-8);
    with reference figures (``refs``, one LungDamage dict or None per row), an ``agreement`` object over the
    images whose reference lesion mask is not empty: n, mae_infected_percent (percentage points),
    severity_exact and severity_within_1 (shares of those images), n_unscored (images among them where
    the prediction found no lung, so no figure could be compared), and by_band: the mean absolute error
    of infected_percent by the reference's infected share (0-25, 25-50, 50-75, 75-100%)."""
    pct = [r["infected_percent"] for r in rows if r["infected_percent"] is not None]
    hist = [0] * 9
    for r in rows:
        if r["severity_score"] is not None:
            hist[r["severity_score"]] += 1
    out = {"n_images": len(rows), "n_no_lung": sum(r["lung_px"] == 0 for r in rows),
           "mean_infected_percent": float(np.mean(pct)) if pct else None, "severity_histogram": hist}
    if refs is not None:
        pairs = [(r, g) for r, g in zip(rows, refs, strict=True) if g is not None and g["infection_px"] > 0]
        scored = [(r, g) for r, g in pairs if r["infected_percent"] is not None and r["severity_score"] is not None
                  and g["severity_score"] is not None]
        err = [abs(r["infected_percent"] - g["infected_percent"]) for r, g in scored]
        dsev = [abs(r["severity_score"] - g["severity_score"]) for r, g in scored]
        bands = []
        for lo, hi in BANDS:  # the error by how much of the (reference) lung is infected
            e = [x for x, (_, g) in zip(err, scored, strict=True) if lo <= g["infected_percent"] < hi]
            bands.append({"band": f"{lo}-{min(hi, 100):g}%", "n": len(e), "mae_infected_percent":
                          float(np.mean(e)) if e else None})
        out["agreement"] = {
            "n": len(scored),
            "n_unscored": len(pairs) - len(scored),
            "mae_infected_percent": float(np.mean(err)) if err else None,
            "severity_exact": float(np.mean([d == 0 for d in dsev])) if dsev else None,
            "severity_within_1": float(np.mean([d <= 1 for d in dsev])) if dsev else None,
            "by_band": bands,
        }
    return out


def picture(gray, lung, infection, d: LungDamage) -> np.ndarray:
    """RGB uint8 (H, W + 200, 3): the X-ray with the lung outlined in cyan and the lesions (inside the lung)
    filled in red, and the figures written in a panel on its right."""
    from PIL import Image, ImageDraw, ImageFont

    from minunet.postprocess import interior, overlay

    lung, infection = np.asarray(lung).astype(bool), np.asarray(infection).astype(bool)
    rgb = overlay(gray, infection & lung, color=(255, 30, 30), alpha=0.45)
    rgb[infection & lung & ~interior(infection & lung)] = (255, 30, 30)  # lesion edge in red, not yellow
    rgb[lung & ~interior(lung)] = (0, 220, 255)
    h, w = lung.shape
    canvas = Image.new("RGB", (w + 200, max(h, 150)), "black")
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()

    def num(v, unit="%"):
        return "-" if v is None else (f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}")

    lines = [f"lung px       {d.lung_px}", f"infected      {num(d.infected_percent)}",
             f"right lung    {num(d.right_lung_percent)} ({num(d.right_extent)})",
             f"left lung     {num(d.left_lung_percent)} ({num(d.left_extent)})",
             f"severity      {num(d.severity_score)}/8", "", "patient's right = image left", "not for diagnosis"]
    for k, line in enumerate(lines):
        draw.text((w + 8, 8 + 14 * k), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)

