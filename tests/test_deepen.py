"""One more U-Net level (``minunet.deepen``, ``minunet export --deepen``): the deeper model computes what
the shallower one does, its new level learns, and train --init takes it."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run
from test_export_formats import random_checkpoint
from test_widen import random_unet

from minunet.checkpoint import load_checkpoint
from minunet.deepen import deepen_params, deepened_model
from minunet.losses import loss_and_grad
from minunet.model import UNet


@settings(max_examples=12, deadline=None)
@given(base=st.integers(1, 4), depth=st.integers(1, 3), seed=st.integers(0, 99))
def test_the_deeper_model_gives_the_shallower_models_logits(base, depth, seed):
    shallow = random_unet(base, depth, seed)
    x = np.random.default_rng(seed).normal(size=(2, 1, 2 ** (depth + 1) * 3, 2 ** (depth + 1) * 2))
    deep = deepened_model(shallow, seed=seed)
    assert deep.depth == depth + 1 and deep.base_channels == base
    np.testing.assert_allclose(deep.forward(x, train=False), shallow.forward(x, train=False), rtol=1e-10,
                               atol=1e-12)


def test_the_layers_move_as_described_and_the_new_level_gets_a_gradient():
    shallow = random_unet(2, 2)
    p = {n: np.asarray(v) for n, v in shallow.params.items()}
    fresh = UNet(1, 2, 3, backend="numpy", dtype="float64", seed=4)
    deep = deepen_params(p, 2, 2, {n: np.asarray(v) for n, v in fresh.params.items()})
    assert list(deep) == list(fresh.params)  # the deeper model's names and order
    for name in ("enc0.conv1.weight", "enc1.conv2.bias", "dec1.up.weight", "dec0.conv1.weight", "head.weight"):
        np.testing.assert_array_equal(deep[name], p[name])  # unchanged layers
    np.testing.assert_array_equal(deep["enc2.conv1.weight"], p["bottleneck.conv1.weight"])  # bottleneck -> enc2
    np.testing.assert_array_equal(deep["enc2.conv2.bias"], p["bottleneck.conv2.bias"])
    np.testing.assert_array_equal(deep["bottleneck.conv2.weight"], np.asarray(fresh.params["bottleneck.conv2.weight"]))
    np.testing.assert_array_equal(deep["dec2.up.weight"], np.asarray(fresh.params["dec2.up.weight"]))
    w = deep["dec2.conv1.weight"]  # (8, 16, 3, 3): the identity on the skip's 8 channels, zero on the up-conv's
    assert w.shape == (8, 16, 3, 3) and not w[:, 8:].any() and w.sum() == 8
    np.testing.assert_array_equal(w[:, :8, 1, 1], np.eye(8))
    np.testing.assert_array_equal(deep["dec2.conv2.weight"][:, :, 1, 1], np.eye(8))
    # the zero weights on the up-conv's channels get a gradient: the new level takes part after one step
    model = deepened_model(shallow, seed=4)
    x = np.random.default_rng(1).random((2, 1, 16, 16))
    y = (np.random.default_rng(2).random(x.shape) > 0.5).astype(float)
    model.zero_grad()
    _, dz = loss_and_grad("bce", model.forward(x), y)
    model.backward(dz)
    assert np.abs(model.grads["dec2.conv1.weight"][:, 8:]).max() > 0


def test_export_deepen_writes_a_model_train_init_takes(tmp_path):
    shallow = random_checkpoint(tmp_path / "c.npz", base=4, depth=2)
    r = run("export", tmp_path / "c.npz", tmp_path / "d.npz", "--deepen", "--float32")
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "d.npz")
    assert ck.model_config["depth"] == 3 and ck.meta["deepened"]["from_depth"] == 2
    assert json.loads((tmp_path / "d.json").read_text())["deepened"]["from_depth"] == 2
    assert run("export", tmp_path / "d.npz", tmp_path / "d2.npz").exit_code == 0  # a second export keeps the record
    assert load_checkpoint(tmp_path / "d2.npz").meta["deepened"] == ck.meta["deepened"]
    x = np.random.default_rng(0).random((1, 1, 32, 32), np.float32)
    np.testing.assert_allclose(ck.build_model("numpy").forward(x, train=False), shallow.forward(x, train=False),
                               rtol=1e-5, atol=1e-6)
    r = run("train", "--base-channels", "4", "--depth", "3", "--size", "32", "--epochs", "1", "--limit", "8",
            "--batch-size", "4", "--backend", "numpy", "--init", tmp_path / "d.npz", "--out", tmp_path / "run",
            "--no-cache")
    assert r.exit_code == 0, r.output
