"""Data-parallel training on MPI: two ranks of one thread each (``mpiexec -n 2``) against one process.

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

import minunet.distributed as distributed
from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, load_arrays
from minunet.errors import ConfigError
from minunet.evaluation import evaluate_model
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
@pytest.mark.parametrize("loss", ["bce", "bce+dice"])
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
