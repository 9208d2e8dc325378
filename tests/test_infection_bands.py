"""benchmarks/infection_tradeoff.py --bands: the lesion model's Dice by infected share of the lung,
on masks whose areas are known."""

from __future__ import annotations

import numpy as np
import pytest
from benchscripts import load_script

tradeoff = load_script("infection_tradeoff")


def test_band_rows_on_masks_of_known_areas():
    lungs = np.ones((3, 10, 10), bool)  # 100 lung pixels each
    ref = np.zeros_like(lungs)
    pred = np.zeros_like(lungs)
    ref[0, 0, :] = True  # 10% infected: band 0-25%
    pred[0, :2, :] = True  # predicted 20 px, holding the 10
    ref[1, :8] = True  # 80%: band 75-100%
    pred[1, :8] = True
    pred[2, 5] = True  # no reference lesion: left out of every band
    rows = {r["band"]: r for r in tradeoff.band_rows(pred, ref, lungs)}
    assert list(rows) == ["0-25%", "25-50%", "50-75%", "75-100%"]
    low, high = rows["0-25%"], rows["75-100%"]
    assert low["n"] == 1 and low["dice"] == pytest.approx(2 * 10 / 30)
    assert low["dice_paint_lung"] == pytest.approx(2 * 10 / 110)
    assert (low["pred_share"], low["ref_share"]) == (pytest.approx(20), pytest.approx(10))
    assert high["n"] == 1 and high["dice"] == pytest.approx(1) and high["dice_paint_lung"] == pytest.approx(160 / 180)
    assert rows["25-50%"] == {"band": "25-50%", "n": 0, "dice": None, "dice_paint_lung": None, "pred_share": None,
                              "ref_share": None}
