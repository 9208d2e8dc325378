"""The training loop: run folder, validation, bit-identical resume after Ctrl-C, NaN stop."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from minidata import make_qu

import minunet.train as train_mod
from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, load_arrays
from minunet.errors import ConfigError
from minunet.evaluation import evaluate_model
from minunet.train import TrainConfig, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qu")
    make_qu(root, n_per_class=4)
    return root


def cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), epochs=2, batch_size=3, base_channels=4, depth=2, size=32,
                backend="numpy", seed=1, val_fraction=0.25, cache_dir="")
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_is_complete(data_dir, tmp_path):
    events = []
    res = train(cfg(data_dir, tmp_path / "run"), lambda e, **i: events.append(e))
    out = tmp_path / "run"
    assert res.status == "done" and len(res.history) == 2
    for name in ("config.json", "split.json", "history.csv", "curves.png", "last.npz", "best.npz"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 9 and len(split["val"]) == 3 and not set(split["train"]) & set(split["val"])
    ck = load_checkpoint(out / "last.npz")
    assert ck.meta["state"]["epoch"] == 2 and ck.meta["state"]["step"] == 6 and ck.adam is not None
    assert events.count("batch") == 6 and events.count("epoch_end") == 2 and events[-1] == "done"
    best = load_checkpoint(out / "best.npz").meta["state"]
    assert best["best_dice"] == max(r["val_dice"] for r in res.history)


def params_and_moments(path):
    ck = load_checkpoint(path)
    return ck.params, ck.adam["m"], ck.adam["v"], ck.meta["state"]


@pytest.mark.parametrize("stop_at,augment", [(4, True), (3, False), (6, False)])
def test_interrupt_and_resume_gives_identical_weights(data_dir, tmp_path, stop_at, augment):
    """Ctrl-C (a KeyboardInterrupt from the progress callback) after step ``stop_at``, then --resume."""
    train(cfg(data_dir, tmp_path / "a", augment=augment))

    steps = []

    def ctrl_c(event, **info):
        if event == "batch":
            steps.append(1)
            if len(steps) == stop_at:
                raise KeyboardInterrupt

    res = train(cfg(data_dir, tmp_path / "b", augment=augment), ctrl_c)
    assert res.status == "interrupted"
    state = load_checkpoint(tmp_path / "b" / "last.npz").meta["state"]
    assert state["step"] == stop_at
    res = train(cfg(data_dir, tmp_path / "b", augment=augment), resume=True)
    assert res.status == "done"
    pa, ma, va, sa = params_and_moments(tmp_path / "a" / "last.npz")
    pb, mb, vb, sb = params_and_moments(tmp_path / "b" / "last.npz")
    for n in pa:
        assert np.array_equal(pa[n], pb[n]), n
        assert np.array_equal(ma[n], mb[n]) and np.array_equal(va[n], vb[n])
    assert sa["step"] == sb["step"] == 6
    for ra, rb in zip(sa["history"], sb["history"], strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_dice"] == rb["val_dice"]


def test_resume_refuses_changed_flags_and_fresh_run_refuses_old_folder(data_dir, tmp_path):
    train(cfg(data_dir, tmp_path / "r", epochs=1))
    with pytest.raises(ConfigError, match="lr"):
        train(cfg(data_dir, tmp_path / "r", epochs=2, lr=0.01), resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg(data_dir, tmp_path / "r", epochs=1))
    with pytest.raises(ConfigError, match="no run to resume"):
        train(cfg(data_dir, tmp_path / "empty"), resume=True)
    res = train(cfg(data_dir, tmp_path / "r", epochs=2), resume=True)  # more epochs is fine
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_resume_refuses_another_backend(data_dir, tmp_path):
    """Bit-for-bit resume holds on the same backend: the backend the run resolved to is checked."""
    train(cfg(data_dir, tmp_path / "r", epochs=1))
    with pytest.raises(ConfigError, match="used the numpy backend.*--backend numpy"):
        train(cfg(data_dir, tmp_path / "r", epochs=2, backend="numba"), resume=True)
    # 'auto' is compared by what it resolves to: a run whose 'auto' meant numpy does not go on with numba
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["train"]["backend"] = "auto"
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="used the numpy backend"):
        train(cfg(data_dir, tmp_path / "r", epochs=2, backend="auto"), resume=True)
    res = train(cfg(data_dir, tmp_path / "r", epochs=2), resume=True)
    assert res.status == "done" and [r["epoch"] for r in res.history] == [1, 2]


def poison_loss(monkeypatch, at_call):
    """Make loss_and_grad return NaN on its ``at_call``-th call (1-based)."""
    calls = []
    real = train_mod.loss_and_grad

    def poisoned(kind, z, y, be):
        calls.append(1)
        loss, dz = real(kind, z, y, be)
        return (float("nan") if len(calls) == at_call else loss), dz

    monkeypatch.setattr(train_mod, "loss_and_grad", poisoned)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    poison_loss(monkeypatch, 5)
    res = train(cfg(data_dir, tmp_path / "n"))
    assert res.status == "nonfinite" and "nan" in res.message and "last good checkpoint" in res.message
    assert str(tmp_path / "n" / "last.npz") in res.message
    state = load_checkpoint(tmp_path / "n" / "last.npz").meta["state"]
    assert state["epoch"] == 1 and state["step"] == 3  # the end of epoch 1, not the poisoned step


@pytest.mark.parametrize("old_run", [False, True])
def test_nonfinite_loss_before_the_first_checkpoint_says_none_was_saved(data_dir, tmp_path, monkeypatch, old_run):
    """In epoch 1 no checkpoint of this run exists: the message must not point at one (with --force,
    the last.npz still in the folder belongs to the old run)."""
    if old_run:
        train(cfg(data_dir, tmp_path / "n", epochs=1))
    poison_loss(monkeypatch, 2)
    res = train(cfg(data_dir, tmp_path / "n"), force=old_run)
    assert res.status == "nonfinite" and "nan" in res.message
    assert "last.npz" not in res.message and "no checkpoint" in res.message, res.message


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0.0), dict(lr=-1.0), dict(batch_size=0), dict(size=34),
                                 dict(val_fraction=1.5), dict(limit=1), dict(loss="mse")])
def test_bad_settings_are_config_errors(data_dir, tmp_path, bad):
    with pytest.raises(ConfigError):
        train(cfg(data_dir, tmp_path / "x", **bad))


class Oracle:
    """A stand-in model whose logits are +-10 from the true masks (optionally wrong on image 0)."""

    def __init__(self, masks, spoil_first=False):
        from minunet.kernels.numpy_ref import NumpyBackend

        self.backend, self.masks, self.spoil, self.i = NumpyBackend(), masks, spoil_first, 0

    def forward(self, x, train=True):
        m = np.asarray(self.masks[self.i : self.i + len(x)], np.float32)[:, None].copy()
        if self.spoil and self.i == 0:
            m[0] = 1 - m[0]
        self.i += len(x)
        return (m * 20 - 10).astype(np.float32)


def test_evaluate_model_scores_per_image_and_per_class(data_dir):
    arr = load_arrays(find_data(data_dir).items(), 32, cache_dir=None)
    ev = evaluate_model(Oracle(arr.masks), arr, batch_size=5)
    assert ev.summary["dice"] == 1.0 and ev.summary["iou"] == 1.0 and ev.summary["n_images"] == 12
    assert set(ev.per_group) == {"COVID-19", "Non-COVID", "Normal"}
    ev = evaluate_model(Oracle(arr.masks, spoil_first=True), arr, batch_size=5)
    assert ev.dice_per_image[0] == 0.0 and np.all(ev.dice_per_image[1:] == 1.0)
    assert ev.summary["dice"] == pytest.approx(11 / 12)
    assert ev.per_group[arr.groups[0]]["dice"] == pytest.approx(3 / 4)


def test_resume_is_bit_identical_on_numba_too(data_dir, tmp_path):
    pytest.importorskip("minunet.kernels.numba_cpu")
    kw = dict(backend="numba", epochs=1)
    train(cfg(data_dir, tmp_path / "a", **kw))

    def ctrl_c(event, **info):
        if event == "batch" and info["batch"] == 2:
            raise KeyboardInterrupt

    assert train(cfg(data_dir, tmp_path / "b", **kw), ctrl_c).status == "interrupted"
    assert train(cfg(data_dir, tmp_path / "b", **kw), resume=True).status == "done"
    pa, ma, _, _ = params_and_moments(tmp_path / "a" / "last.npz")
    pb, mb, _, _ = params_and_moments(tmp_path / "b" / "last.npz")
    assert all(np.array_equal(pa[n], pb[n]) and np.array_equal(ma[n], mb[n]) for n in pa)
