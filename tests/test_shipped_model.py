"""The pretrained models shipped in the package: they load, they segment the shipped sample, and
``minunet quantify`` runs on it with both of them.

The sample's 150 images were kept out of both models' training and validation (the committed split
leaves the sample out, and the lung model's first stage used ``--exclude minunet/assets/sample/FILES.txt``),
so these are held-out checks; the model cards in the README give the full numbers.
"""

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from minunet.checkpoint import load_checkpoint
from minunet.cli import main
from minunet.cli.common import DEFAULT_INFECTION_MODEL, DEFAULT_MODEL, SAMPLE_DATA

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="no shipped model in this checkout")


def test_shipped_model_is_a_float16_lung_unet():
    ck = load_checkpoint(DEFAULT_MODEL)
    model = ck.build_model("numpy")
    assert (model.base_channels, model.depth, model.in_channels) == (16, 4, 1)
    assert ck.meta["weights_dtype"] == "float16"
    assert ck.meta["train_config"]["split_file"] == "covid-qu-ex"  # v2 to v7: the committed split's train list
    assert ck.postprocess == {"threshold": 0.5, "min_area": 0.02, "view_shift": 6}  # chosen on the val images


def test_shipped_model_segments_the_held_out_sample(tmp_path):
    args = ["evaluate", str(SAMPLE_DATA), "--json", "--backend", "numba", "--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    assert scores["n_images"] == 150
    assert scores["min_area"] == 0.02 and scores["view_shift"] == 6 and scores["n_trained_on"] == 0
    # measured 0.9688 when v7 shipped, with its views (v6 0.9677, v5 0.9672, v4 0.9665, v3 0.9647, v1 0.9625)
    assert scores["dice"] > 0.955, scores


needs_lesion_model = pytest.mark.skipif(not DEFAULT_INFECTION_MODEL.exists(), reason="no shipped infection model")


@needs_lesion_model
def test_shipped_infection_model_carries_its_post_processing():
    ck = load_checkpoint(DEFAULT_INFECTION_MODEL)
    assert ck.meta["train_config"]["mask"] == "infection" and ck.input_size == 128
    assert ck.postprocess == {"threshold": 0.3, "min_area": 0.02, "view_shift": 0}  # chosen on the val images


@needs_lesion_model
def test_shipped_infection_model_on_the_held_out_sample(tmp_path):
    args = ["evaluate", str(SAMPLE_DATA), "--mask", "infection", "--json", "--backend", "numba",
            "--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["n_images"], s["n_nonempty"], s["threshold"], s["min_area"]) == (150, 50, 0.3, 0.02)
    # measured when the model was shipped (v3): dice_nonempty 0.617, fp_image_rate 0.07
    assert s["dice_nonempty"] > 0.59 and s["fp_image_rate"] < 0.13, s


@needs_lesion_model
def test_quantify_with_both_shipped_models(tmp_path):
    """Four COVID-19 images of the sample in a COVID-QU-Ex folder of their own, with their reference masks."""
    src = SAMPLE_DATA / "Infection Segmentation Data" / "Train" / "COVID-19"
    dst = tmp_path / "data" / "Infection Segmentation Data" / "Train" / "COVID-19"
    for sub in ("images", "lung masks", "infection masks"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / "images").iterdir())[:4]:
            shutil.copy(src / sub / f.name, dst / sub / f.name)
    r = CliRunner().invoke(main, ["quantify", str(tmp_path / "data"), "--out", str(tmp_path / "q"),
                                  "--backend", "numba"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "q" / "quantify.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(float(r["lung_px"]) > 0 for r in rows)
    assert all(0 <= float(r["infected_percent"]) <= 100 and 0 <= int(r["severity_score"]) <= 8 for r in rows)
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["agreement"]["n"] == 4 and len(list((tmp_path / "q").glob("*_quantify.png"))) == 4
