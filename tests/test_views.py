"""Shifted views at predict time (minunet.views): the shift moves content the way it says, each view's
probability is shifted back onto the image, and evaluate, predict and quantify take the model's default
or the --view-shift flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_cli import assert_one_line_error, run, trained  # noqa: F401 (trained is a fixture)

from minunet.data import ArraySet
from minunet.evaluation import evaluate_model
from minunet.kernels import get_backend
from minunet.model import UNet
from minunet.views import DIRECTIONS, shifted, view_probability


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), dy=st.integers(-6, 6), dx=st.integers(-6, 6), seed=st.integers(0, 99))
def test_shifted_moves_the_content_and_repeats_the_edge(h, w, dy, dx, seed):
    a = np.random.default_rng(seed).normal(size=(2, 1, h, w))
    out = shifted(a, dy, dx)
    # out[i, j] = a[i - dy, j - dx], the index clipped to the image: content moved by (dy, dx), edges repeated
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    np.testing.assert_array_equal(out, a[..., rows[:, None], cols[None, :]])


class Pointwise:
    """A 'model' whose logit at a pixel is a function of that pixel alone: shifted views of it must give
    its own probability wherever no view reaches past the image's edge."""

    def __init__(self):
        self.backend = get_backend("numpy")

    def forward(self, x, train=False):
        return 3 * x - 1 + x**2


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("shift", [1, 3])
def test_views_of_a_pointwise_model_give_its_own_probability_inside_the_edge(shift):
    x = np.random.default_rng(0).normal(size=(3, 1, 16, 12)).astype(np.float32)
    model = Pointwise()
    alone = sigmoid(model.forward(x.astype(np.float64)))
    views = view_probability(model, x, shift)
    inner = (..., slice(shift, -shift), slice(shift, -shift))
    np.testing.assert_allclose(views[inner], alone[inner], rtol=1e-6)
    assert not np.allclose(views, alone, rtol=1e-6)  # at the edge the views see repeated rows


def test_views_average_the_image_and_four_shifted_copies_shifted_back():
    model = UNet(1, 4, 2, backend="numpy", seed=1)
    x = np.random.default_rng(2).uniform(size=(2, 1, 16, 16)).astype(np.float32)

    def prob(a):
        return sigmoid(np.asarray(model.forward(a.astype(np.float32), train=False), np.float64))

    np.testing.assert_allclose(view_probability(model, x, 0), prob(x), rtol=1e-5, atol=1e-6)
    s = 3
    want = (prob(x) + sum(shifted(prob(shifted(x, s * uy, s * ux)), -s * uy, -s * ux)
                          for uy, ux in DIRECTIONS)) / 5
    got = view_probability(model, x, s)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, prob(x), atol=1e-4)  # the views change the probability of a real U-Net


def test_evaluate_scores_the_probability_of_the_views():
    model = UNet(1, 4, 2, backend="numpy", seed=1)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 16, 16), dtype=np.uint8)
    masks = rng.integers(0, 2, size=(5, 16, 16), dtype=np.uint8)
    data = ArraySet(images, masks, [f"i{k}" for k in range(5)], ["all"] * 5, mask_stats=None)
    seen = {}
    ev = evaluate_model(model, data, 2, view_shift=2, each_probability=seen.__setitem__)
    want = view_probability(model, images[:, None].astype(np.float32) / np.float32(255), 2)[:, 0]
    np.testing.assert_allclose(np.stack([seen[k] for k in range(5)]), want, rtol=1e-6)
    plain = evaluate_model(model, data, 2)
    assert ev.summary["loss"] == plain.summary["loss"]  # the loss is the image's own


def test_the_view_shift_is_the_models_default_and_the_flag_wins(trained, tmp_path):  # noqa: F811
    best = trained / "run" / "best.npz"
    r = run("export", best, tmp_path / "v.npz", "--view-shift", "2")
    assert r.exit_code == 0, r.output
    base = ("evaluate", trained / "data", "--json", "--backend", "numpy", "--model")
    with_views = json.loads(run(*base, tmp_path / "v.npz").stdout)
    alone = json.loads(run(*base, tmp_path / "v.npz", "--view-shift", "0").stdout)
    assert with_views["view_shift"] == 2 and alone["view_shift"] == 0
    assert json.loads(run(*base, best).stdout)["view_shift"] == 0  # a model that says nothing
    assert with_views["dice"] != alone["dice"] or with_views["dice_pooled"] != alone["dice_pooled"]
    assert_one_line_error(run(*base, best, "--view-shift", "-1"), "--view-shift")
    assert_one_line_error(run(*base, best, "--view-shift", "32"), "--view-shift", "32 px")  # the model's size
    assert_one_line_error(run("export", best, tmp_path / "x.npz", "--view-shift", "-2"), "--view-shift")


def test_predict_and_quantify_take_the_view_shift(trained, tmp_path):  # noqa: F811
    img = trained / "data" / "Infection Segmentation Data" / "Test" / "Normal" / "images" / "Normal (Test 0).png"
    best = trained / "run" / "best.npz"
    outs = {}
    for shift in ("0", "3"):
        out = tmp_path / f"p{shift}"
        r = run("predict", img, "--out", out, "--model", best, "--backend", "numpy", "--save-prob",
                "--view-shift", shift)
        assert r.exit_code == 0, r.output
        outs[shift] = np.asarray(Image.open(out / "Normal (Test 0)_prob.png"))
    assert not np.array_equal(outs["0"], outs["3"])
    r = run("quantify", img, "--out", tmp_path / "q", "--lung-model", best, "--infection-model", best,
            "--backend", "numpy", "--view-shift", "2")
    assert r.exit_code == 0, r.output
    assert_one_line_error(run("predict", img, "--out", tmp_path / "e", "--model", best, "--view-shift", "40"),
                          "--view-shift")
