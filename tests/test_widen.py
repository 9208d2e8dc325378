"""Net2WiderNet (``minunet.widen``, ``minunet export --widen``): the wide model computes what the narrow
one does, its channel copies are split so that they drift apart in training, and train --init takes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run
from test_export_formats import random_checkpoint

from minunet.checkpoint import load_checkpoint
from minunet.model import UNet
from minunet.widen import _channel_map, widen_params, widened_model


def random_unet(base, depth, seed=1, dtype="float64") -> UNet:
    model = UNet(1, base, depth, backend="numpy", dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():  # nonzero biases: a wrong bias copy must show
        if name.endswith("bias"):
            p[...] = rng.normal(0, 0.1, p.shape)
    return model


@settings(max_examples=12, deadline=None)
@given(base=st.integers(1, 4), depth=st.integers(1, 3), factor=st.integers(1, 3), seed=st.integers(0, 99))
def test_the_wide_model_gives_the_narrow_models_logits(base, depth, factor, seed):
    narrow = random_unet(base, depth, seed)
    x = np.random.default_rng(seed).normal(size=(2, 1, 2**depth * 3, 2**depth * 2))
    wide = widened_model(narrow, factor, seed=seed, noise=0.3)
    assert wide.base_channels == base * factor and wide.depth == depth
    np.testing.assert_allclose(wide.forward(x, train=False), narrow.forward(x, train=False), rtol=1e-10, atol=1e-12)


def test_copies_share_the_outgoing_weights_and_split_the_incoming_ones():
    narrow = random_unet(2, 2)
    p = {n: np.asarray(v) for n, v in narrow.params.items()}
    exact = widen_params(p, 2, 2, 2, noise=0.0)
    noisy = widen_params(p, 2, 2, 2, seed=5, noise=0.1)
    w, w2 = p["enc1.conv2.weight"], exact["enc1.conv2.weight"]  # (4, 4, 3, 3) -> (8, 8, 3, 3)
    assert w2.shape == (8, 8, 3, 3)
    np.testing.assert_array_equal(w2[:4, :4], w[:, :] / 2)
    np.testing.assert_array_equal(w2[4:, 4:], w / 2)  # output copy 4+o reads like o
    np.testing.assert_array_equal(exact["enc1.conv2.bias"], np.tile(p["enc1.conv2.bias"], 2))
    # the image channel and the single logit are not widened
    assert exact["enc0.conv1.weight"].shape == (4, 1, 3, 3) and exact["head.weight"].shape == (1, 4, 1, 1)
    # the up-conv is (Cin, Cout, 2, 2); dec0.conv1 reads [skip | up], each group copied on its own
    assert exact["dec0.up.weight"].shape == (8, 4, 2, 2) and exact["dec0.conv1.weight"].shape == (4, 8, 3, 3)
    src, copy = _channel_map([2, 2], 2)
    np.testing.assert_array_equal(src, [0, 1, 0, 1, 2, 3, 2, 3])
    np.testing.assert_array_equal(copy, [0, 0, 1, 1, 0, 0, 1, 1])
    # with noise the two halves differ, but still sum to the narrow weight
    n2 = noisy["enc1.conv2.weight"]
    assert not np.array_equal(n2[:4, :4], n2[:4, 4:])
    np.testing.assert_allclose(n2[:4, :4] + n2[:4, 4:], w, rtol=1e-12)
    # seeded: the same file every time
    np.testing.assert_array_equal(widen_params(p, 2, 2, 2, seed=5, noise=0.1)["dec0.conv1.weight"],
                                  noisy["dec0.conv1.weight"])


@pytest.mark.parametrize("factor", [0, 1.5, True])
def test_widen_refuses_a_factor_that_is_not_a_whole_number_from_one(factor):
    with pytest.raises(ValueError, match="factor"):
        widen_params({}, 2, 2, factor)


def test_export_widen_writes_a_model_train_init_takes(tmp_path):
    narrow = random_checkpoint(tmp_path / "c.npz", base=4, depth=2)
    r = run("export", tmp_path / "c.npz", tmp_path / "w.npz", "--widen", "2", "--float32")
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "w.npz")
    assert ck.model_config["base_channels"] == 8 and ck.meta["widened"]["factor"] == 2
    assert json.loads((tmp_path / "w.json").read_text())["widened"]["from_base_channels"] == 4
    # the export's noise parts the copies: the two halves that read one channel differ
    w = ck.params["enc1.conv1.weight"]  # (16, 8, 3, 3): input channels c and c + 4 copy c
    assert not np.allclose(w[:, :4], w[:, 4:])
    # a second export (another format) keeps the record
    assert run("export", tmp_path / "w.npz", tmp_path / "w2.npz").exit_code == 0
    assert load_checkpoint(tmp_path / "w2.npz").meta["widened"] == ck.meta["widened"]
    x = np.random.default_rng(0).random((1, 1, 32, 32), np.float32)
    wide = ck.build_model("numpy")
    np.testing.assert_allclose(wide.forward(x, train=False), narrow.forward(x, train=False), rtol=1e-4, atol=1e-5)
    r = run("train", "--base-channels", "8", "--depth", "2", "--size", "32", "--epochs", "1", "--limit", "8",
            "--batch-size", "4", "--backend", "numpy", "--init", tmp_path / "w.npz", "--out", tmp_path / "run",
            "--no-cache")
    assert r.exit_code == 0, r.output
