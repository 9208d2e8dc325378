"""The pretrained lung model shipped in the package: it loads, and it segments the shipped sample.

The sample's 150 images were kept out of the model's training and validation
(``minunet train --exclude minunet/assets/sample/FILES.txt``), so this is a
held-out check; the model card in the README gives the full numbers.
"""

import json

import pytest
from click.testing import CliRunner

from minunet.checkpoint import load_checkpoint
from minunet.cli import main
from minunet.cli.common import DEFAULT_MODEL, SAMPLE_DATA

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="no shipped model in this checkout")


def test_shipped_model_is_a_float16_lung_unet():
    ck = load_checkpoint(DEFAULT_MODEL)
    model = ck.build_model("numpy")
    assert (model.base_channels, model.depth, model.in_channels) == (16, 4, 1)
    assert ck.meta["weights_dtype"] == "float16"


def test_shipped_model_segments_the_held_out_sample(tmp_path):
    args = ["evaluate", str(SAMPLE_DATA), "--json", "--backend", "numba", "--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    assert scores["n_images"] == 150
    assert scores["dice"] > 0.95, scores  # measured 0.9625 when the model was shipped
