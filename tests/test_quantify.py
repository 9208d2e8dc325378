"""Lung-damage arithmetic on synthetic masks with known areas, and `minunet quantify` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from minidata import make_qu

from minunet.cli import main
from minunet.quantify import COLUMNS, extent, lung_damage, split_column, summarise


def two_lungs(h=10, w=24):
    """The patient's right lung in columns 2-9 (image left), the left lung in columns 14-21: 80 px each."""
    lung = np.zeros((h, w), bool)
    lung[:, 2:10] = True
    lung[:, 14:22] = True
    return lung


def test_percentages_extents_and_score_of_known_areas():
    lung = two_lungs()
    inf = np.zeros_like(lung)
    inf[:, 2:4] = True  # 20 px of the right lung: 25% -> extent 2
    inf[0:3, 14:22] = True  # 24 px of the left lung: 30% -> extent 2
    inf[:, 11] = True  # outside the lung: not counted
    d = lung_damage(lung, inf)
    assert (d.lung_px, d.infection_px) == (160, 44)
    assert d.infected_percent == pytest.approx(100 * 44 / 160)
    assert d.right_lung_percent == pytest.approx(25.0) and d.left_lung_percent == pytest.approx(30.0)
    assert (d.right_extent, d.left_extent, d.severity_score) == (2, 2, 4)


def test_the_patients_right_lung_is_the_images_left():
    lung = two_lungs()
    inf = np.zeros_like(lung)
    inf[:, 2:10] = True  # the whole lung on the image's left
    d = lung_damage(lung, inf)
    assert d.right_lung_percent == 100.0 and d.left_lung_percent == 0.0
    assert (d.right_extent, d.left_extent, d.severity_score) == (4, 0, 4)


def test_extent_bands():
    cases = {0: 0, 0.01: 1, 24.99: 1, 25: 2, 49.99: 2, 50: 3, 74.99: 3, 75: 4, 100: 4}
    assert {p: extent(p) for p in cases} == cases
    assert extent(None) is None


def test_a_lung_in_pieces_is_split_by_the_line_between_the_two_largest_pieces():
    lung = two_lungs(h=12)
    lung[4, 2:10] = False  # the right lung breaks into two pieces (rows 0-3: 32 px, rows 5-11: 56 px)
    lung[:, 2] = False  # and a third, small one
    lung[0, 2] = True
    col = split_column(lung)
    assert 9 < col < 14  # between the largest right piece and the left lung, not through either lung
    inf = np.zeros_like(lung)
    inf[0:4, :12] = lung[0:4, :12]  # the whole upper right piece and the speck
    d = lung_damage(lung, inf)
    assert d.left_lung_percent == 0.0 and d.right_lung_percent == pytest.approx(100 * inf.sum() / lung[:, :12].sum())


def test_one_component_is_split_at_the_image_centre():
    lung = np.zeros((6, 10), bool)
    lung[1:5, 1:9] = True  # one blob across the middle: 4 px per column, columns 1-8
    assert split_column(lung) == 4.5
    inf = np.zeros_like(lung)
    inf[1:5, 1:3] = True  # columns 1-2 of the right half (columns 1-4)
    d = lung_damage(lung, inf)
    assert d.right_lung_percent == 50.0 and d.left_lung_percent == 0.0 and d.severity_score == 3


def test_no_lung_gives_empty_figures_not_a_crash():
    d = lung_damage(np.zeros((5, 5), bool), np.ones((5, 5), bool))
    assert d.lung_px == 0 and d.infection_px == 0
    assert all(getattr(d, c) is None for c in COLUMNS[2:])
    with pytest.raises(ValueError):
        lung_damage(np.zeros((5, 5)), np.zeros((5, 6)))


def test_summary_and_agreement():
    rows = [lung_damage(two_lungs(), m).as_dict() for m in (np.zeros((10, 24), bool), two_lungs())]
    rows.append(lung_damage(np.zeros((10, 24)), np.zeros((10, 24))).as_dict())  # no lung
    ref_inf = np.zeros((10, 24), bool)
    ref_inf[:, 2:8] = True  # 60 px of the right lung: 75% -> extent 4, 37.5% in all
    refs = [lung_damage(two_lungs(), np.zeros((10, 24))).as_dict(), lung_damage(two_lungs(), ref_inf).as_dict(), None]
    s = summarise(rows, refs)
    assert s["n_images"] == 3 and s["n_no_lung"] == 1
    assert s["mean_infected_percent"] == pytest.approx(50.0)  # (0 + 100) / 2: the no-lung image has no figure
    assert s["severity_histogram"] == [1, 0, 0, 0, 0, 0, 0, 0, 1]
    a = s["agreement"]  # only the second image has a reference lesion
    assert a["n"] == 1 and a["n_unscored"] == 0
    assert a["mae_infected_percent"] == pytest.approx(100 - 37.5)
    assert a["severity_exact"] == 0.0 and a["severity_within_1"] == 0.0  # 8 vs 4
    assert [b["n"] for b in a["by_band"]] == [0, 1, 0, 0]  # 37.5% of the reference lung is infected
    assert a["by_band"][1] == {"band": "25-50%", "n": 1, "mae_infected_percent": pytest.approx(62.5)}
    assert "agreement" not in summarise(rows)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantify_end_to_end_on_a_covid_qu_ex_folder(tmp_path):
    make_qu(tmp_path / "data", n_per_class=2)
    tiny = ["--backend", "numpy", "--base-channels", "4", "--depth", "2", "--size", "32", "--no-cache"]
    r = run("train", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "run", *tiny)
    assert r.exit_code == 0, r.output
    model = tmp_path / "run" / "best.npz"
    r = run("quantify", tmp_path / "data", "--out", tmp_path / "q", "--lung-model", model, "--infection-model", model,
            "--backend", "numpy")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "q" / "quantify.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert list(rows[0])[:9] == ["image", *COLUMNS]
    assert list(rows[0])[9:] == ["ref_infected_percent", "ref_severity_score"]
    covid = [r for r in rows if "COVID_19" in r["image"]]
    assert all(float(r["ref_infected_percent"]) > 0 for r in covid)  # make_qu's lesion: the image's left half
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["n_images"] == 6 and len(summary["severity_histogram"]) == 9
    assert summary["agreement"]["n"] + summary["agreement"]["n_unscored"] == 2
    pics = sorted(p.name for p in (tmp_path / "q").glob("*_quantify.png"))
    assert len(pics) == 6
    r = run("quantify", tmp_path / "data", "--out", tmp_path / "q2", "--lung-model", model, "--backend", "numpy",
            "--infection-model", tmp_path / "missing.npz")
    assert r.exit_code == 2 and "missing.npz" in r.output
