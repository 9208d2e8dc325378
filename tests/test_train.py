"""The training loop: run folder, validation, bit-identical resume after Ctrl-C, NaN stop."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from minidata import make_qu
from test_cli import run

import minunet.train as train_mod
from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, load_arrays
from minunet.errors import ConfigError, DataError
from minunet.evaluation import evaluate_model
from minunet.interrupt import interrupt_after
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


@pytest.mark.parametrize("stop_at,augment,whiten,weight", [(4, True, 0.0, 1.0), (3, False, 0.0, 1.0),
                                                           (6, False, 0.0, 1.0), (4, True, 1.0, 3.0)])
def test_interrupt_and_resume_gives_identical_weights(data_dir, tmp_path, stop_at, augment, whiten, weight):
    """Ctrl-C (a KeyboardInterrupt from the progress callback) after step ``stop_at``, then --resume."""
    augment = dict(augment=augment, whiten_lesions=whiten, lesion_weight=weight)
    train(cfg(data_dir, tmp_path / "a", **augment))

    res = train(cfg(data_dir, tmp_path / "b", **augment), interrupt_after(stop_at))
    assert res.status == "interrupted"
    state = load_checkpoint(tmp_path / "b" / "last.npz").meta["state"]
    assert state["step"] == stop_at
    res = train(cfg(data_dir, tmp_path / "b", **augment), resume=True)
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
    with pytest.raises(ConfigError, match="batch_size"):
        train(cfg(data_dir, tmp_path / "r", epochs=2, batch_size=2), resume=True)
    with pytest.raises(ConfigError, match="loss"):
        train(cfg(data_dir, tmp_path / "r", epochs=2, loss="bce+dice"), resume=True)
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


def poison_loss(monkeypatch, at_call, value=float("nan")):
    """Make loss_and_grad return ``value`` (NaN) on its ``at_call``-th call (1-based)."""
    calls = []
    real = train_mod.loss_and_grad

    def poisoned(kind, z, y, be, weights=None, on_device=False):
        calls.append(1)
        loss, dz = real(kind, z, y, be, weights, on_device)
        return (value if len(calls) == at_call else loss), dz

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
    # advice that works: start again with a smaller lr (over the old run only with --force)
    assert "--lr 0.0001" in res.message and "--resume" not in res.message, res.message
    assert ("--force" in res.message) == old_run, res.message


def test_the_nonfinite_stop_advice_can_be_followed_with_resume(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "n"
    poison_loss(monkeypatch, 5)
    res = train(cfg(data_dir, out, epochs=3))
    assert res.status == "nonfinite"
    assert f"--resume --out {out} --lr 0.0001" in res.message, res.message
    monkeypatch.undo()
    events = []
    res = train(cfg(data_dir, out, epochs=3, lr=1e-4), lambda e, **i: events.append((e, i)), resume=True)
    assert res.status == "done" and [r["epoch"] for r in res.history] == [1, 2, 3]
    assert [r["lr"] for r in res.history] == [1e-3, 1e-4, 1e-4]
    change = {"setting": "lr", "from": 1e-3, "to": 1e-4, "epoch": 2, "batch": 0, "step": 3}
    notes = [i["message"] for e, i in events if e == "note"]
    assert any("--lr" in n and "no longer bitwise comparable" in n and "epoch 2" in n for n in notes), notes
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 1e-4 and config["changes"] == [change]
    assert load_checkpoint(out / "last.npz").meta["state"]["changes"] == [change]
    # resuming again with the new lr changes nothing more
    res = train(cfg(data_dir, out, epochs=4, lr=1e-4), resume=True)
    assert json.loads((out / "config.json").read_text())["changes"] == [change]


def test_a_diverging_loss_stops_like_a_nonfinite_one(data_dir, tmp_path, monkeypatch):
    """BCE and Dice losses are about 0.7 at the start and >= 0: 1e26 is a diverged run, not a finite loss."""
    poison_loss(monkeypatch, 5, 1e26)
    res = train(cfg(data_dir, tmp_path / "d"))
    assert res.status == "diverged" and "1e+26" in res.message and "diverged" in res.message, res.message
    assert "--lr 0.0001" in res.message and str(tmp_path / "d" / "last.npz") in res.message
    assert load_checkpoint(tmp_path / "d" / "last.npz").meta["state"]["step"] == 3


def test_a_run_on_relative_paths_resumes_from_another_folder(data_dir, tmp_path, monkeypatch):
    """The data, --exclude and --init paths are stored resolved and compared resolved."""
    (tmp_path / "exclude.txt").write_text("Normal (Train 0).png\n")
    monkeypatch.chdir(data_dir.parent)
    train(cfg(data_dir.name, tmp_path / "r", epochs=1, exclude=str(tmp_path / "exclude.txt")))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["data"] == str(data_dir.resolve())
    monkeypatch.chdir(tmp_path)
    res = train(cfg(data_dir.resolve(), tmp_path / "r", epochs=2, exclude="exclude.txt"), resume=True)
    assert res.status == "done" and len(res.history) == 2
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = run("train", "--resume", "--out", tmp_path / "r", "--epochs", "3")
    assert r.exit_code == 0, r.output
    r = run("train", tmp_path, "--resume", "--out", tmp_path / "r", "--epochs", "3")
    assert r.exit_code == 2 and "data" in r.stderr, r.output  # another folder is still refused


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0.0), dict(lr=-1.0), dict(batch_size=0), dict(size=34),
                                 dict(val_fraction=1.5), dict(limit=1), dict(loss="mse"),
                                 dict(whiten_lesions=0.5), dict(whiten_lesions=1.5, augment=True),
                                 dict(whiten_lesions=0.5, augment=True, mask="infection"),
                                 dict(severe_repeat=0), dict(severe_repeat=2, mask="infection"),
                                 dict(lesion_weight=0.5), dict(lesion_weight=float("inf")),
                                 dict(lesion_weight=2.0, mask="infection")])
def test_bad_settings_are_config_errors(data_dir, tmp_path, bad):
    with pytest.raises(ConfigError):
        train(cfg(data_dir, tmp_path / "x", **bad))


def test_lesion_whitening_changes_the_lung_run_and_needs_infection_masks(data_dir, tmp_path):
    plain = train(cfg(data_dir, tmp_path / "plain", epochs=1, augment=True))
    white = train(cfg(data_dir, tmp_path / "white", epochs=1, augment=True, whiten_lesions=1.0))
    assert plain.history[0]["train_loss"] != white.history[0]["train_loss"]  # the COVID-19 images were whitened
    saved = json.loads((tmp_path / "white" / "config.json").read_text())["train"]
    assert saved["whiten_lesions"] == 1.0
    with pytest.raises(ConfigError, match="whiten_lesions"):
        train(cfg(data_dir, tmp_path / "white", epochs=2, augment=True), resume=True)
    no_infection = tmp_path / "lungs_only"
    make_qu(no_infection, n_per_class=4, infection=False)
    with pytest.raises(DataError, match="--whiten-lesions, --severe-repeat and --lesion-weight need the data.s "
                                        "infection masks"):
        train(cfg(no_infection, tmp_path / "x", augment=True, whiten_lesions=0.5))


def test_severe_repeat_lengthens_the_epoch_by_the_severe_images(data_dir, tmp_path):
    events = []
    res = train(cfg(data_dir, tmp_path / "rep", epochs=1, severe_repeat=3), lambda e, **i: events.append((e, i)))
    # make_qu's COVID-19 lesions cover the left half of each lung: half or more of it, so severe. Of the 9
    # training images 3 are COVID-19 (val_fraction 0.25 keeps 1 of each class's 4 for validation).
    split = json.loads((tmp_path / "rep" / "split.json").read_text())
    n_severe = sum("COVID_19" in name for name in split["train"])
    assert n_severe == 3 and res.status == "done"
    assert [i["n_batches"] for e, i in events if e == "epoch_start"] == [-(-(9 + 2 * n_severe) // 3)]
    with pytest.raises(DataError, match="--severe-repeat and --lesion-weight need"):
        no_infection = tmp_path / "lungs_only"
        make_qu(no_infection, n_per_class=4, infection=False)
        train(cfg(no_infection, tmp_path / "x", severe_repeat=2))


def test_lesion_weight_changes_the_lung_run_and_is_kept_on_resume(data_dir, tmp_path):
    plain = train(cfg(data_dir, tmp_path / "plain", epochs=1))
    heavy = train(cfg(data_dir, tmp_path / "heavy", epochs=1, lesion_weight=4.0))
    # make_qu's COVID-19 images have lesions inside the lung: their pixels weigh 4 times, so the loss grows
    assert heavy.history[0]["train_loss"] > plain.history[0]["train_loss"]
    assert json.loads((tmp_path / "heavy" / "config.json").read_text())["train"]["lesion_weight"] == 4.0
    with pytest.raises(ConfigError, match="lesion_weight"):
        train(cfg(data_dir, tmp_path / "heavy", epochs=2), resume=True)
    no_infection = tmp_path / "lungs_only"
    make_qu(no_infection, n_per_class=4, infection=False)
    with pytest.raises(DataError, match="--lesion-weight need"):
        train(cfg(no_infection, tmp_path / "x", lesion_weight=2.0))


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(data_dir, tmp_path):
    train(cfg(data_dir, tmp_path / "old", epochs=1))
    path = tmp_path / "old" / "config.json"
    info = json.loads(path.read_text())
    for key in ("whiten_lesions", "severe_repeat", "lesion_weight"):  # as written before those settings
        del info["train"][key]
    path.write_text(json.dumps(info))
    res = train(cfg(data_dir, tmp_path / "old", epochs=2), resume=True)
    assert res.status == "done" and [r["epoch"] for r in res.history] == [1, 2]
    with pytest.raises(ConfigError, match="whiten_lesions"):
        train(cfg(data_dir, tmp_path / "old", epochs=3, augment=True, whiten_lesions=0.5), resume=True)


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
    pytest.importorskip("numba")
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


# -- what the user sees: img/s, the ETA, curves.png -------------------------------------------


def test_the_img_per_s_of_an_epoch_counts_training_only(data_dir, tmp_path, monkeypatch):
    import time

    import minunet.distributed as distributed_mod  # training validates through Ranks.evaluate

    real = distributed_mod.evaluate_model

    def slow_validation(*a, **kw):
        time.sleep(1.0)
        return real(*a, **kw)

    monkeypatch.setattr(distributed_mod, "evaluate_model", slow_validation)
    res = train(cfg(data_dir, tmp_path / "s", epochs=1))
    row = res.history[0]
    assert row["seconds"] > 1.0  # the epoch's time includes validation
    assert row["images_per_s"] > 9 / (row["seconds"] - 1.0), row  # 9 training images, in under seconds - 1


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_bar_shows_an_eta(monkeypatch, tty):
    import io

    from minunet.cli import common

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    clock = FakeClock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    stream = Stream()
    bar = common.Bar(stream, log_every=0.0)
    bar.update("epoch 1/3", 0, 100)
    for done in (10, 20):
        clock.t += 5.0  # 2 batches a second
        bar.update("epoch 1/3", done, 100, force=True)
    assert "ETA 0:40" in stream.getvalue().splitlines()[-1].split("\r")[-1], stream.getvalue()  # 80 left
    clock.t += 3700.0
    bar.update("epoch 2/3", 1, 100, force=True)
    clock.t += 3700.0
    bar.update("epoch 2/3", 2, 100, force=True)  # a new label starts a new estimate: 98 x 3700 s
    assert "ETA 100:43:20" in stream.getvalue(), stream.getvalue()


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_bar_reads_a_callable_extra_only_for_a_line_it_draws(monkeypatch, tty):
    """Training hands the bar its loss text as a callable: on a GPU, reading the loss waits for the GPU."""
    import io

    from minunet.cli import common

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    clock = FakeClock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    stream, calls = Stream(), []
    bar = common.Bar(stream, log_every=60.0)

    def extra():
        calls.append(1)
        return "loss 0.1234"

    clock.t += 61.0
    bar.update("epoch 1/1", 1, 100, extra)  # drawn (a tty draws at once; a log after log_every)
    assert len(calls) == 1 and "loss 0.1234" in stream.getvalue()
    for done in range(2, 50):  # no time passes: nothing is drawn, nothing read
        bar.update("epoch 1/1", done, 100, extra)
    assert len(calls) == 1


def test_curves_keep_dice_on_a_0_to_1_axis(tmp_path):
    from PIL import Image

    from minunet.charts import draw_curves

    rows = [{"epoch": e, "train_loss": 0.5 / e, "val_loss": 0.6 / e, "val_dice": d, "val_iou": d - 0.1}
            for e, d in ((1, 0.80), (2, 0.81), (3, 0.82))]
    draw_curves(tmp_path / "c.png", rows)
    a = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    green = np.all(a == (44, 160, 44), axis=-1)  # the val Dice line and dots
    green[:, : a.shape[1] // 2] = False  # the score panel is the right half
    green[300:] = False  # not the legend at the bottom
    ys = np.nonzero(green)[0]
    top, bottom = 34, 400 - 44  # the panel's frame
    # on a 0-1 axis the three points lie within 2% of the panel's height, around 0.81 of it
    assert ys.max() - ys.min() < 0.02 * (bottom - top) + 10, (ys.min(), ys.max())
    assert abs(ys.mean() - (bottom - 0.81 * (bottom - top))) < 5, ys.mean()


# -- an asynchronous backend (a GPU): losses read now and then, batches uploaded ahead ------------------


def make_asynchronous(patch):
    """The numpy backend flagged asynchronous, as a GPU's is, with losses read every 2 steps (3 per epoch
    here, so some reads fall inside an epoch and one at its end); ``patch`` is a monkeypatch. Returns the
    types of the losses the loop gets from ``batch_gradient``, as it gets them."""
    from minunet.kernels.numpy_ref import NumpyBackend

    patch.setattr(NumpyBackend, "asynchronous", True)
    patch.setattr(train_mod, "LOSS_READ_EVERY", 2)
    kinds, real = [], train_mod.batch_gradient

    def spy(*a, **kw):
        loss = real(*a, **kw)
        kinds.append(type(loss))
        return loss

    patch.setattr(train_mod, "batch_gradient", spy)
    return kinds


@pytest.fixture
def asynchronous(monkeypatch):
    return make_asynchronous(monkeypatch)


def test_an_asynchronous_backend_trains_to_the_same_bits(data_dir, tmp_path, monkeypatch):
    train(cfg(data_dir, tmp_path / "sync"))
    with monkeypatch.context() as m:
        kinds = make_asynchronous(m)
        train(cfg(data_dir, tmp_path / "async"))
    # no loss went through float(), which is what waits for a GPU (on NumPy they are numpy float64 scalars)
    assert len(kinds) == 6 and float not in kinds
    pa, ma, va, sa = params_and_moments(tmp_path / "sync" / "last.npz")
    pb, mb, vb, sb = params_and_moments(tmp_path / "async" / "last.npz")
    for n in pa:
        assert np.array_equal(pa[n], pb[n]) and np.array_equal(ma[n], mb[n]) and np.array_equal(va[n], vb[n]), n
    for ra, rb in zip(sa["history"], sb["history"], strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_dice"] == rb["val_dice"]


def test_an_asynchronous_backend_stops_on_a_nan_at_the_next_read(data_dir, tmp_path, asynchronous, monkeypatch):
    """The 5th loss (epoch 2, batch 2) is NaN: it is read at step 6, the end of epoch 2 (reads every 2 steps
    and at the end of each epoch: steps 2, 3 | 5, 6); the message names the poisoned batch and nothing of
    the steps after it is saved."""
    poison_loss(monkeypatch, 5)
    res = train(cfg(data_dir, tmp_path / "n", epochs=3))
    assert res.status == "nonfinite" and "epoch 2, batch 2" in res.message, res.message
    state = load_checkpoint(tmp_path / "n" / "last.npz").meta["state"]
    assert state["epoch"] == 1 and state["step"] == 3


def test_an_interrupt_on_an_asynchronous_backend_reads_the_losses_before_saving(data_dir, tmp_path,
                                                                                 asynchronous):
    train(cfg(data_dir, tmp_path / "a"))

    def ctrl_c(event, **info):
        if event == "batch" and info["epoch"] == 2 and info["batch"] == 1:  # one loss of epoch 2 unread
            raise KeyboardInterrupt

    assert train(cfg(data_dir, tmp_path / "b"), ctrl_c).status == "interrupted"
    state = load_checkpoint(tmp_path / "b" / "last.npz").meta["state"]
    assert state["step"] == 4 and state["n_seen"] == 3 and state["loss_sum"] > 0  # the unread loss counted
    assert train(cfg(data_dir, tmp_path / "b"), resume=True).status == "done"
    _, _, _, sa = params_and_moments(tmp_path / "a" / "last.npz")
    _, _, _, sb = params_and_moments(tmp_path / "b" / "last.npz")
    assert [r["train_loss"] for r in sa["history"]] == [r["train_loss"] for r in sb["history"]]


def test_the_next_batch_is_uploaded_after_the_step_that_reads_the_current_one(data_dir, tmp_path, monkeypatch):
    """``upload_async``'s contract: batch k+1 is handed over after the step of batch k is queued."""
    from minunet.kernels.numpy_ref import NumpyBackend

    calls, real_upload, real_step = [], NumpyBackend.upload_async, train_mod.batch_gradient
    monkeypatch.setattr(NumpyBackend, "upload_async",
                        lambda self, *a, **kw: calls.append("upload") or real_upload(self, *a, **kw))
    monkeypatch.setattr(train_mod, "batch_gradient", lambda *a, **kw: calls.append("step") or real_step(*a, **kw))
    train(cfg(data_dir, tmp_path / "u", epochs=1))
    assert calls == ["upload", "step"] * 3


def test_the_loss_reader_reads_in_order_and_stops_at_the_first_bad_loss():
    from minunet.train import DIVERGED_LOSS, LossReader

    state = {"loss_sum": 0.0, "n_seen": 0}
    r = LossReader(every=3)
    assert r.add(0, 0, np.float64(0.5), 2, state) is None and r.add(0, 1, np.float64(0.25), 2, state) is None
    assert state["n_seen"] == 0  # not read yet
    assert r.add(0, 2, np.float64(0.125), 4, state) is None  # the third: all three read
    assert state == {"loss_sum": 0.5 * 2 + 0.25 * 2 + 0.125 * 4, "n_seen": 8}
    assert r.add(1, 0, 2.0, 1, state) is None
    assert r.add(1, 1, 10 * DIVERGED_LOSS, 1, state, read_now=True) == (1, 1, 10 * DIVERGED_LOSS)
    assert state["n_seen"] == 9  # the good one before the bad one is counted, the bad one is not
    assert r.read(state) is None  # nothing left


def test_only_one_process_on_an_asynchronous_backend_keeps_its_losses_on_the_device():
    from types import SimpleNamespace

    from minunet.train import loss_stays_on_device

    gpu, cpu = SimpleNamespace(asynchronous=True), SimpleNamespace(asynchronous=False)
    one, two = SimpleNamespace(size=1), SimpleNamespace(size=2)
    assert loss_stays_on_device(gpu, one)
    assert not loss_stays_on_device(gpu, two)  # ranks sum their losses on the host at every step
    assert not loss_stays_on_device(cpu, one)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_image_term_trains_on_every_cpu_backend(data_dir, tmp_path, backend):
    """--loss bce+dice+image through the whole loop."""
    if backend == "numba":
        pytest.importorskip("numba")
    res = train(cfg(data_dir, tmp_path / "run", loss="bce+dice+image", backend=backend, epochs=1))
    assert res.status == "done" and np.isfinite(res.history[0]["train_loss"])


def test_the_image_term_gives_the_numba_step_the_numpy_gradient():
    """A batch with one lesion image and two empty ones: the gradient of every parameter under
    bce+dice+image on the numba backend equals the numpy reference's, to float32 rounding."""
    pytest.importorskip("numba")
    from minunet.distributed import Ranks
    from minunet.kernels import get_backend
    from minunet.model import UNet
    from minunet.train import batch_gradient

    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 32, 32)).astype(np.float32)
    y = np.zeros_like(x)
    y[0, 0, 8:20, 8:20] = 1
    grads = {}
    for name in ("numpy", "numba"):
        model = UNet(1, 4, 2, backend=get_backend(name), seed=5)
        batch_gradient(model, "bce+dice+image", x, y, Ranks())
        grads[name] = {k: model.backend.to_host(g) for k, g in model.grads.items()}
    for k, g in grads["numpy"].items():
        assert np.allclose(grads["numba"][k], g, rtol=1e-3, atol=1e-5), k
