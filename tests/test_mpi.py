"""Data-parallel training, and evaluate, predict and quantify with shared-out inputs, on MPI: two ranks of one
thread each (``mpiexec -n 2``) against one process.

The MPI tests need mpi4py and an ``mpiexec`` (the ``mpi`` extra: ``pip install -e '.[mpi]'``) and skip
without them. Tolerance of "equal to float32 rounding": summing two shards' gradients rounds
differently from one pass over the batch, so a gradient agrees to 1e-5 of its tensor's largest value
(float32 keeps 7 digits; sums over 3 x 32 x 32 pixels lose about 2), and weights after 6 Adam steps of
lr 1e-3 agree to 1e-5 (1% of one step: Adam divides by the gradient's running size, which magnifies
rounding where a gradient is near zero).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from minidata import make_qu
from mpi_worker import gradient_batch
from PIL import Image

import minunet.distributed as distributed
from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, load_arrays
from minunet.errors import ConfigError
from minunet.evaluation import evaluate_model, mean_loss
from minunet.losses import LOSSES
from minunet.model import UNet
from minunet.train import TrainConfig, batch_gradient, train

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")

TINY = dict(epochs=2, batch_size=3, base_channels=4, depth=2, size=32, backend="numpy", seed=1, val_fraction=0.25,
            cache_dir="")


def env():
    """The environment of the ranks: this checkout's minunet and the tests' helpers first."""
    path = os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def mpiexec(*args, n=2, timeout=240, check=True):
    """Run ``python ARGS`` on n ranks; the completed process (its output in .stdout, .stderr)."""
    r = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


CLI = ("-c", "from minunet.cli import main; main()")


def cli_train(data, out, *extra, n=2, **kw):
    flags = []
    for k, v in {**TINY, **kw}.items():
        if k == "cache_dir":
            flags.append("--no-cache")
        else:
            flags += [f"--{k.replace('_', '-')}", v]
    return mpiexec(*CLI, "train", data, "--out", out, "--threads", 1, *flags, *extra, n=n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi")
    make_qu(root, n_per_class=4)  # 12 images: 9 train (3 batches of 3, 2 + 1 images per rank), 3 val
    return root


@pytest.fixture(scope="module")
def two_rank_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-rank run of the CLI (6 steps)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    r = cli_train(data_dir, out)
    assert "best val Dice" in r.stdout and r.stdout.count("best val Dice") == 1  # rank 0 alone reports
    return out


def load(path):
    ck = load_checkpoint(path)
    return ck.params, ck.adam["m"], ck.adam["v"], ck.meta["state"]


# -- without MPI -----------------------------------------------------------------------


def test_shards_are_contiguous_and_cover_the_batch():
    for n in range(0, 12):
        for parts in (1, 2, 3, 5):
            pieces = [distributed.shard_range(n, parts, k) for k in range(parts)]
            assert pieces[0][0] == 0 and pieces[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            sizes = [hi - lo for lo, hi in pieces]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_merged_shard_scores_equal_the_whole_set(data_dir):
    """The merge behind distributed validation: loss, Dice, IoU, per class and per image equal exactly."""
    data = load_arrays(find_data(data_dir, "lung").items(), 32)
    model = UNet(1, 4, 2, backend="numpy", seed=2)
    whole = evaluate_model(model, data, 5)
    parts = [evaluate_model(model, distributed.subset(data, lo, hi), 5) for lo, hi in ((0, 10), (10, 12), (12, 12))]
    merged = distributed.merge_results(parts)
    assert merged.summary == whole.summary and merged.per_group == whole.per_group  # the loss too, to the bit
    assert np.array_equal(merged.dice_per_image, whole.dice_per_image) and merged.names == whole.names


def test_merged_loss_adds_every_batch_in_order(data_dir):
    """The loss of merged shards: every batch's summed loss added in order, as one process adds them, to the bit.
    (Adding up the shards' means times their sizes would give ...004 for ...003 here.)"""
    data = load_arrays(find_data(data_dir, "lung").items()[:5], 32)
    model = UNet(1, 4, 2, backend="numpy", seed=2)
    parts = [evaluate_model(model, distributed.subset(data, lo, hi), 1) for lo, hi in ((0, 3), (3, 5))]
    sums = [[0.4049341374504143, 0.7837985890347726, 0.30331272607892745], [0.4765969541523558, 0.5833820394550312]]
    for p, s in zip(parts, sums, strict=True):
        p.batch_losses, p.summary["loss"] = s, mean_loss(s, len(s))
    assert distributed.merge_results(parts).summary["loss"] == 0.5104048892343003


def test_one_process_does_not_import_mpi4py():
    code = "import sys, minunet.cli, minunet.train; sys.exit('mpi4py' in sys.modules)"
    for extra in ({}, {"PMI_SIZE": "1"}):
        assert subprocess.run([sys.executable, "-c", code], env={**env(), **extra}).returncode == 0, extra


def test_several_ranks_without_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    monkeypatch.setattr(distributed, "_WORLD", None)
    with pytest.raises(ConfigError, match=r"one of 2 processes.*pip install 'minunet\[mpi\]'"):
        distributed.world()


# -- two ranks -------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize("loss", LOSSES)
def test_the_shards_gradients_sum_to_the_whole_batch_gradient(tmp_path, loss):
    """3 images on 2 ranks (2 + 1): each share is weighted by its size, the sum is the batch's gradient."""
    mpiexec(WORKER, "gradient", tmp_path / "g.npz", loss)
    got = np.load(tmp_path / "g.npz")
    model, x, y = gradient_batch()
    want = batch_gradient(model, loss, x, y, distributed.Ranks())
    assert float(got["loss"]) == pytest.approx(want, rel=1e-6)
    for name, g in model.grads.items():
        err = np.abs(got[f"grad/{name}"] - g).max()
        assert err <= 1e-5 * np.abs(g).max(), (name, err, np.abs(g).max())


@needs_mpi
def test_two_ranks_train_like_one_process_and_repeat_bit_for_bit(data_dir, two_rank_run, tmp_path):
    one = train(TrainConfig(data=str(data_dir), out=str(tmp_path / "one"), **TINY))
    p2, m2, v2, s2 = load(two_rank_run / "last.npz")
    p1, *_ = load(tmp_path / "one" / "last.npz")
    assert s2["step"] == 6
    for n in p1:
        assert np.abs(p1[n] - p2[n]).max() <= 1e-5, n
    for r1, r2 in zip(one.history, s2["history"], strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-6)
    cli_train(data_dir, tmp_path / "again")
    pb, mb, vb, sb = load(tmp_path / "again" / "last.npz")
    for n in p2:
        assert np.array_equal(p2[n], pb[n]) and np.array_equal(m2[n], mb[n]) and np.array_equal(v2[n], vb[n]), n
    assert [r["val_dice"] for r in sb["history"]] == [r["val_dice"] for r in s2["history"]]
    info = json.loads((two_rank_run / "config.json").read_text())
    assert info["ranks"] == 2 and not (two_rank_run / ".lock").exists()


@needs_mpi
def test_an_interrupted_two_rank_run_resumes_to_the_same_weights(data_dir, two_rank_run, tmp_path):
    """Rank 0 alone gets SIGINT after step 4: both ranks stop after it; --resume ends like the uninterrupted run."""
    out = tmp_path / "b"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": str(data_dir), "out": str(out), "threads": 1, **TINY}))
    r = mpiexec(WORKER, "train", config, 4)
    assert "rank 0: interrupted" in r.stdout and "rank 1: interrupted" in r.stdout
    assert load(out / "last.npz")[3]["step"] == 4
    shutil.copytree(out, tmp_path / "c")
    cli_train(data_dir, out, "--resume")
    pa, ma, va, sa = load(two_rank_run / "last.npz")
    pb, mb, vb, sb = load(out / "last.npz")
    for n in pa:
        assert np.array_equal(pa[n], pb[n]) and np.array_equal(ma[n], mb[n]) and np.array_equal(va[n], vb[n]), n
    assert [r["train_loss"] for r in sa["history"]] == [r["train_loss"] for r in sb["history"]]
    # Resuming on another number of ranks works and is recorded: no longer bitwise comparable from there.
    notes = []
    res = train(TrainConfig(data=str(data_dir), out=str(tmp_path / "c"), **TINY), resume=True,
                progress=lambda e, **i: notes.append(i.get("message", "")) if e == "note" else None)
    assert res.status == "done" and any("resumed on 1 process(es), the run had 2" in m for m in notes)
    change = json.loads((tmp_path / "c" / "config.json").read_text())["changes"][-1]
    assert (change["setting"], change["from"], change["to"], change["step"]) == ("ranks", 2, 1, 4)


@needs_mpi
def test_validation_on_two_ranks_equals_one_process(data_dir, two_rank_run, tmp_path):
    """12 images in batches of 5: rank 0 scores batches 1-2 (10 images), rank 1 batch 3 (2 images)."""
    mpiexec(WORKER, "evaluate", data_dir, two_rank_run / "last.npz", tmp_path / "ev.json")
    got = json.loads((tmp_path / "ev.json").read_text())
    data = load_arrays(find_data(data_dir, "lung").items(), 32)
    want = evaluate_model(load_checkpoint(two_rank_run / "last.npz").build_model("numpy"), data, 5)
    assert got["summary"] == want.summary and got["per_group"] == want.per_group  # the loss too, to the bit
    assert got["dice"] == want.dice_per_image.tolist() and got["names"] == want.names


@needs_mpi
def test_ctrl_c_on_mpiexec_stops_every_rank_with_a_checkpoint(data_dir, tmp_path):
    out = tmp_path / "long"
    cmd = [MPIEXEC, "-n", "2", sys.executable, *CLI, "train", str(data_dir), "--out", str(out), "--threads", "1",
           "--no-cache", *[str(a) for k, v in TINY.items() if k not in ("epochs", "cache_dir")
                           for a in (f"--{k.replace('_', '-')}", v)], "--epochs", "500"]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.npz").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)  # no rank hangs
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, stdout, stderr)
    assert stderr.count("interrupted (SIGINT)") == 1 and "--resume" in stderr  # rank 0 alone says it
    state = load(out / "last.npz")[3]
    assert 1 <= state["epoch"] < 500 and not (out / ".lock").exists()


@needs_mpi
def test_an_error_on_one_rank_ends_every_rank(data_dir, tmp_path):
    """Rank 1 raises in its second step while rank 0 waits for its gradient: MPI_Abort ends both (no hang)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": str(data_dir), "out": str(tmp_path / "f"), "threads": 1, **TINY}))
    r = mpiexec(WORKER, "fail", config, check=False, timeout=60)
    assert r.returncode != 0
    assert "rank 1 of 2" in r.stderr and "planted failure on rank 1" in r.stderr


@needs_mpi
def test_an_error_every_rank_meets_is_printed_once(data_dir, tmp_path):
    """A bad setting, or --resume of a folder without a run: one line from rank 0, exit status 2."""
    for extra in (("--epochs", "0"), ("--resume",)):
        r = mpiexec(*CLI, "train", data_dir, "--out", tmp_path / "none", *extra, check=False, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("Error:") == 1, r.stderr


@needs_mpi
def test_two_numba_ranks_of_one_thread_repeat_bit_for_bit(data_dir, two_rank_run, tmp_path):
    """The default CPU backend: each rank's pool has one thread; two runs give the same bytes, and they
    agree with the numpy backend's 2-rank run to float32 rounding."""
    for name in ("n1", "n2"):
        cli_train(data_dir, tmp_path / name, backend="numba")
    p1, m1, _, _ = load(tmp_path / "n1" / "last.npz")
    p2, m2, _, _ = load(tmp_path / "n2" / "last.npz")
    pn, *_ = load(two_rank_run / "last.npz")
    for n in p1:
        assert np.array_equal(p1[n], p2[n]) and np.array_equal(m1[n], m2[n]), n
        assert np.abs(p1[n] - pn[n]).max() <= 1e-5, n


# -- evaluate, predict and quantify on two ranks ------------------------------------------


def cli(*args, n=2, check=True):
    """``minunet ARGS`` as one process (n=1, no mpiexec) or on n ranks."""
    if n > 1:
        return mpiexec(*CLI, *args, n=n, check=check)
    r = subprocess.run([sys.executable, *CLI, *map(str, args)], env=env(), capture_output=True, text=True,
                       timeout=240)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def models(data_dir, tmp_path_factory):
    """A tiny lung model and a tiny lesion model trained on ``data_dir`` (one process, a fraction of a second)."""
    out = tmp_path_factory.mktemp("models")
    for mask in ("lung", "infection"):
        train(TrainConfig(data=str(data_dir), out=str(out / mask), mask=mask, **TINY))
    return out / "lung" / "last.npz", out / "infection" / "last.npz"


def same_files(a: Path, b: Path) -> list:
    """The names of the files in folder ``a``, after checking that folder ``b`` holds the same files, byte for byte."""
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


@needs_mpi
def test_evaluate_on_two_ranks_equals_one_process(data_dir, models, tmp_path):
    """12 images in batches of 5: rank 0 decodes and scores 10, rank 1 2; the JSON (loss, Dice, IoU, per class,
    mask counts, images seen in training), the text report, the per-image CSV and the probability maps are
    those of one process."""
    args = ("evaluate", data_dir, "--model", models[0], "--split", "all", "--batch-size", 5, "--threshold", 0.45,
            "--cache-dir", tmp_path / "cache")
    runs = {}
    for n in (1, 2):
        runs[n] = cli(*args, "--json", "--per-image", tmp_path / f"scores{n}.csv", "--save-prob", tmp_path / f"p{n}",
                      n=n)
        runs[n, "text"] = cli(*args, n=n)
    assert runs[2].stdout == runs[1].stdout and runs[2, "text"].stdout == runs[1, "text"].stdout
    got = json.loads(runs[2].stdout)
    assert got["n_images"] == 12 and 0 < got["dice"] < 1 and got["masks"].startswith("masks: 12 ")
    assert 0 < got["n_trained_on"] < 12 and runs[2].stderr.count("warning:") == 1
    assert [ln for ln in runs[2].stderr.splitlines() if ln.startswith("warning:")] == \
        [ln for ln in runs[1].stderr.splitlines() if ln.startswith("warning:")]
    assert (tmp_path / "scores2.csv").read_bytes() == (tmp_path / "scores1.csv").read_bytes()
    assert len(same_files(tmp_path / "p1", tmp_path / "p2")) == 12


@needs_mpi
def test_evaluate_errors_every_rank_meets_are_printed_once(data_dir, tmp_path):
    for extra in (("--batch-size", "0"), ("--model", tmp_path / "none.npz")):
        r = cli("evaluate", data_dir, "--split", "all", *extra, check=False)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.count("Error:") == 1, r.stderr


@needs_mpi
def test_predict_on_two_ranks_equals_one_process(data_dir, models, tmp_path):
    """14 inputs in batches of 3 (rank 0: 9, rank 1: 5), among them an unreadable file and a second image of
    the same name as the first, which rank 1 segments: the same files, byte for byte, and the same report."""
    extra = tmp_path / "extra"
    extra.mkdir()
    first = sorted((data_dir / "Infection Segmentation Data").rglob("images/*.png"))[0]
    shutil.copy(first, extra / first.name)
    (extra / "broken.png").write_bytes(b"not a png")
    runs = {n: cli("predict", data_dir / "Infection Segmentation Data", extra, "--out", tmp_path / f"out{n}",
                   "--model", models[0], "--threshold", 0.45, "--batch-size", 3, "--save-prob", "--skip-bad", n=n)
            for n in (1, 2)}
    names = same_files(tmp_path / "out1", tmp_path / "out2")
    assert len(names) == 13 * 3 and f"{first.stem}_2_mask.png" in names
    assert runs[2].stdout.replace("out2", "out1") == runs[1].stdout and "skipped 1 unreadable" in runs[2].stdout
    assert [ln for ln in runs[2].stderr.splitlines() if ln.startswith("skipped:")] == \
        [ln for ln in runs[1].stderr.splitlines() if ln.startswith("skipped:")] != []
    masks = [np.asarray(Image.open(tmp_path / "out2" / n)) for n in names if n.endswith("_mask.png")]
    assert any(m.any() for m in masks) and not all(m.all() for m in masks)


@needs_mpi
def test_a_bad_file_in_one_ranks_share_ends_every_rank(data_dir, models, tmp_path):
    """Without --skip-bad, rank 1 meets the unreadable file of its share: it says so and ends the job at once."""
    first = sorted((data_dir / "Infection Segmentation Data").rglob("images/*.png"))[0]
    shutil.copy(first, tmp_path / "a.png")
    (tmp_path / "z.png").write_bytes(b"not a png")
    r = mpiexec(*CLI, "predict", tmp_path / "a.png", tmp_path / "z.png", "--out", tmp_path / "out", "--model",
                models[0], "--batch-size", 1, check=False, timeout=60)
    assert r.returncode != 0 and "rank 1 of 2" in r.stderr and "z.png" in r.stderr and "--skip-bad" in r.stderr


@needs_mpi
def test_quantify_on_two_ranks_equals_one_process(data_dir, models, tmp_path):
    """12 X-rays with reference masks in batches of 5 (rank 0: 10, rank 1: 2): quantify.csv, summary.json and
    the pictures are one process's, byte for byte."""
    runs = {n: cli("quantify", data_dir, "--out", tmp_path / f"q{n}", "--lung-model", models[0],
                   "--infection-model", models[1], "--threshold", 0.45, "--batch-size", 5, n=n)
            for n in (1, 2)}
    names = same_files(tmp_path / "q1", tmp_path / "q2")
    assert len(names) == 12 + 2 and {"quantify.csv", "summary.json"} <= set(names)
    assert runs[2].stdout.replace("q2", "q1") == runs[1].stdout
    assert json.loads((tmp_path / "q2" / "summary.json").read_text())["n_images"] == 12


@pytest.mark.gpu
@needs_mpi
def test_two_cupy_ranks_reduce_through_the_host(data_dir, two_rank_run, tmp_path):
    """On one GPU both ranks use it (rank i of a machine takes GPU i modulo its GPUs); the gradients go
    through the host reduction: the run agrees with the numpy backend's 2-rank run to float32 rounding."""
    from minunet.kernels.cupy import cuda_status

    has_gpu, why = cuda_status()
    if not has_gpu:
        pytest.skip(why)
    cli_train(data_dir, tmp_path / "gpu", backend="cupy")
    pg, *_ = load(tmp_path / "gpu" / "last.npz")
    pn, *_ = load(two_rank_run / "last.npz")
    for n in pg:
        assert np.abs(pg[n] - pn[n]).max() <= 1e-5, n
