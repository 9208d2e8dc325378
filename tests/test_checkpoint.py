"""Checkpoints: exact round trip, float16 weights, atomic writes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from minunet.checkpoint import load_checkpoint, save_checkpoint
from minunet.errors import CheckpointError
from minunet.model import UNet
from minunet.optim import Adam


def trained_pair(seed=0):
    model = UNet(1, 4, 2, backend="numpy", seed=seed)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=model.backend)
    rng = np.random.default_rng(seed)
    x = rng.random((2, 1, 16, 16)).astype(np.float32)
    y = (x > 0.5).astype(np.float32)
    for _ in range(2):
        model.zero_grad()
        _, dz = model.backend.sigmoid_bce(model.forward(x), y)
        model.backward(dz)
        opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = trained_pair()
    save_checkpoint(tmp_path / "c.npz", model, opt, {"epoch": 3, "state": {"step": 7}})
    ck = load_checkpoint(tmp_path / "c.npz")
    assert ck.meta["epoch"] == 3 and ck.meta["state"]["step"] == 7 and ck.model_config["depth"] == 2
    model2 = UNet(1, 4, 2, backend="numpy", seed=5)
    opt2 = Adam(model2.params, model2.grads, backend=model2.backend)
    ck.load_into(model2, opt2)
    for n in model.params:
        assert np.array_equal(model.params[n], model2.params[n])
        assert np.array_equal(opt.m[n], opt2.m[n]) and np.array_equal(opt.v[n], opt2.v[n])
    assert opt2.t == opt.t == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left


def test_float16_weights_only(tmp_path):
    model, _ = trained_pair()
    save_checkpoint(tmp_path / "h.npz", model, None, {}, weights_dtype="float16")
    ck = load_checkpoint(tmp_path / "h.npz")
    assert ck.adam is None and all(a.dtype == np.float16 for a in ck.params.values())
    m2 = ck.build_model("numpy")
    for n, p in model.params.items():
        assert m2.params[n].dtype == np.float32
        np.testing.assert_allclose(m2.params[n], p, rtol=1e-3, atol=1e-4)
    with pytest.raises(CheckpointError, match="weights only"):
        ck.load_into(m2, Adam(m2.params, m2.grads))


def test_overwrite_keeps_a_valid_file(tmp_path):
    model, opt = trained_pair()
    path = tmp_path / "c.npz"
    save_checkpoint(path, model, opt, {"n": 1})
    save_checkpoint(path, model, opt, {"n": 2})
    assert load_checkpoint(path).meta["n"] == 2


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a minunet checkpoint"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a minunet checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    model, opt = trained_pair()
    save_checkpoint(tmp_path / "c.npz", model, opt)
    ck = load_checkpoint(tmp_path / "c.npz")
    with pytest.raises(CheckpointError, match="depth 3"):
        ck.check_model_config({"depth": 3})
    with pytest.raises(CheckpointError, match="does not match"):
        ck.load_into(UNet(1, 8, 2, backend="numpy"))


def test_files_get_the_usual_permissions_without_touching_the_umask(tmp_path, monkeypatch):
    """The process umask is never set (not even for a moment at import), yet a checkpoint gets
    0o666 & ~umask like any file the user's programs write."""
    import importlib
    import os
    import stat

    import minunet.checkpoint as ckmod

    real_umask = os.umask
    calls = []
    old = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        importlib.reload(ckmod)
        model, opt = trained_pair()
        ckmod.save_checkpoint(tmp_path / "c.npz", model, opt)
        monkeypatch.undo()
    finally:
        real_umask(old)
    assert calls == []
    assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == 0o640


@pytest.mark.parametrize("path,name", [
    ("/data/COVID-QU-Ex/Infection Segmentation Data/", "COVID-QU-Ex/Infection Segmentation Data"),
    ("C:\\Users\\ana\\scans\\lungs", "scans/lungs"),
    ("minunet/assets/sample/FILES.txt", "sample/FILES.txt"),
    ("covid-qu-ex", "covid-qu-ex"),
])
def test_path_name_keeps_the_last_two_names(path, name):
    from minunet.checkpoint import path_name

    assert path_name(path) == name


def test_non_finite_or_non_float_weights_are_refused_by_name(tmp_path):
    model, opt = trained_pair()
    model.params["enc1.conv1.bias"][2] = np.nan
    save_checkpoint(tmp_path / "nan.npz", model, opt)
    with pytest.raises(CheckpointError, match=r"parameter enc1\.conv1\.bias holds NaN or inf \(1 of 8"):
        load_checkpoint(tmp_path / "nan.npz")
    model, opt = trained_pair()
    opt.v["head.weight"][...] = np.inf
    save_checkpoint(tmp_path / "inf.npz", model, opt)
    with pytest.raises(CheckpointError, match=r"Adam's v of head\.weight holds NaN or inf"):
        load_checkpoint(tmp_path / "inf.npz")
    with np.load(tmp_path / "inf.npz") as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("adam")}
    arrays["param/head.bias"] = np.zeros(1, np.int64)
    np.savez(tmp_path / "int.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"parameter head\.bias is int64, not floating point"):
        load_checkpoint(tmp_path / "int.npz")


@pytest.mark.parametrize("meta,adam,named", [
    ([1, 2], None, "its meta is [1, 2], not an object"),  # the meta itself is not an object
    ({"model": {"in_channels": 1, "base_channels": 4}}, None, "lacks model.depth"),
    ({"model": {"in_channels": 1, "base_channels": 4, "depth": 2}, "rng": "seed 0"}, None, "meta rng is"),
    ({"model": {"in_channels": 1, "base_channels": 4, "depth": 2}}, {"t": 2, "lr": 0.1, "betas": 0.9, "eps": 1e-8},
     "meta adam.betas is 0.9, not two numbers"),
    ({"model": {"in_channels": 1, "base_channels": 4, "depth": 2}}, {"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-8},
     "lacks adam.t"),
])
def test_meta_and_optimizer_settings_of_the_wrong_shape_are_refused(tmp_path, meta, adam, named):
    import json
    import re

    model, opt = trained_pair()
    save_checkpoint(tmp_path / "c.npz", model, opt)
    with np.load(tmp_path / "c.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps(meta))
    if adam is not None:
        arrays["adam"] = np.array(json.dumps(adam))
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_checkpoint(tmp_path / "c.npz")
