"""A run survives the operating system: SIGTERM, a second training in the same folder, killed writers,
a full disk, an --out that cannot be written, sizes that cannot be allocated. Each test builds the
situation with real processes and files (a full disk is simulated by a write that raises ENOSPC)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from minidata import make_qu
from test_cli import TINY, assert_one_line_error, run

from minunet.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

# `minunet train` whose progress hook, at the STOP_AT-th EVENT (a "batch" event is an optimizer step;
# 3 steps an epoch here), prints STEPPED and waits (up to 60 s) for the signal the test sends: the
# signal then lands at a known point, between two steps say.
PAUSING_TRAIN = textwrap.dedent("""
    import sys, time
    import minunet.cli.train as cli_train
    stop_at, stop_event = int(sys.argv.pop(1)), sys.argv.pop(1)
    real, asked, steps = cli_train.TrainReporter.__call__, [], []

    def hook(self, event, **info):
        real(self, event, **info)
        if event == "interrupt_requested":
            asked.append(event)
        if event == stop_event:
            steps.append(1)
            if len(steps) == stop_at:
                print("STEPPED", flush=True)
                t0 = time.monotonic()
                while not asked and time.monotonic() - t0 < 60:
                    time.sleep(0.01)

    cli_train.TrainReporter.__call__ = hook
    from minunet.cli import main
    main()
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qu")
    make_qu(root, n_per_class=4)
    return root


def start_paused_training(data, out, stop_at, event="batch"):
    """A `minunet train` process, paused at the ``stop_at``-th ``event`` (it holds the run folder)."""
    args = [sys.executable, "-c", PAUSING_TRAIN, str(stop_at), event, "train", str(data), "--out", str(out),
            "--epochs", "2", *TINY]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while line and "STEPPED" not in line:
        line = proc.stdout.readline()
    if "STEPPED" not in line:
        proc.kill()
        raise AssertionError(f"the training did not start stepping: {proc.communicate()}")
    return proc


def same_weights(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.meta["state"]["step"] == cb.meta["state"]["step"]
    for n in ca.params:
        assert np.array_equal(ca.params[n], cb.params[n]), n
        assert np.array_equal(ca.adam["m"][n], cb.adam["m"][n]) and np.array_equal(ca.adam["v"][n], cb.adam["v"][n])


# -- SIGTERM ------------------------------------------------------------------------


def test_sigterm_saves_a_resumable_checkpoint_like_ctrl_c(data, tmp_path):
    """What schedulers, `docker stop` and `timeout` send: the step finishes, last.npz is written, exit 143."""
    proc = start_paused_training(data, tmp_path / "b", 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "SIGTERM" in stderr and "--resume" in stderr, stderr
    assert load_checkpoint(tmp_path / "b" / "last.npz").meta["state"]["step"] == 2
    r = run("train", data, "--resume", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    r = run("train", data, "--out", tmp_path / "a", "--epochs", "2", *TINY)  # uninterrupted
    assert r.exit_code == 0, r.output
    same_weights(tmp_path / "a" / "last.npz", tmp_path / "b" / "last.npz")


def test_sigterm_while_the_data_is_decoded_stops_at_once(data, tmp_path):
    proc = start_paused_training(data, tmp_path / "run", 1, "decode")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert "before the first step" in stderr and "epoch" not in stdout, (stdout, stderr)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no checkpoint, no lock left


# -- one training per run folder ------------------------------------------------------


def test_a_second_training_in_the_same_folder_is_refused(data, tmp_path):
    proc = start_paused_training(data, tmp_path / "run", 4)  # in epoch 2: last.npz of epoch 1 is there
    try:
        r = run("train", data, "--out", tmp_path / "run", "--epochs", "2", *TINY, "--force")
        assert_one_line_error(r, str(tmp_path / "run"), f"PID {proc.pid}")
        r = run("train", data, "--out", tmp_path / "run", "--resume")
        assert r.exit_code == 2 and f"PID {proc.pid}" in r.stderr, r.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # the first run was not disturbed: it saved and stopped
    assert run("train", data, "--out", tmp_path / "run", "--resume").exit_code == 0


def test_a_lock_left_by_a_killed_training_is_cleared(data, tmp_path):
    proc = start_paused_training(data, tmp_path / "run", 1)
    proc.kill()  # SIGKILL: nothing runs on the way out, the lock stays behind
    proc.communicate(timeout=60)
    r = run("train", data, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert r.exit_code == 0, r.output
    assert f"stale lock of PID {proc.pid}" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def test_a_lock_taken_on_another_host_is_not_guessed_stale(data, tmp_path):
    (tmp_path / "run").mkdir()
    lock = {"pid": 1234567, "host": "another-node", "started": "2030-01-01T00:00:00"}
    (tmp_path / "run" / ".lock").write_text(json.dumps(lock))
    r = run("train", data, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert_one_line_error(r, "PID 1234567", "another-node", ".lock")


# -- temporaries of killed writers ----------------------------------------------------

# A writer that starts a checkpoint (or a cache entry) and then dies mid-write (as kill -9 or a power cut
# would leave it) or stays alive mid-write (another rank of a distributed run, say).
WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    what, folder, how = sys.argv[1], sys.argv[2], sys.argv[3]

    def partial(f, *args, **kwargs):
        f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        f.write(b"PK partial")
        f.flush()
        if how == "die":
            os._exit(9)
        print("WRITING", flush=True)
        time.sleep(120)

    np.savez = np.save = partial
    if what == "checkpoint":
        from minunet.checkpoint import save_checkpoint
        from minunet.model import UNet
        save_checkpoint(os.path.join(folder, "last.npz"), UNet(1, 2, 1))
    else:
        from minunet.data import find_data, load_arrays
        load_arrays(find_data(sys.argv[4]).items(), 32, folder)
""")


def writers(what, folder, *extra):
    """(temporaries left by a writer killed mid-write, a live writer paused mid-write, its temporaries)."""
    before = set(Path(folder).iterdir()) if Path(folder).exists() else set()
    dead = subprocess.run([sys.executable, "-c", WRITER, what, str(folder), "die", *extra], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert dead.returncode == 9, dead.stderr
    dead_tmp = set(Path(folder).iterdir()) - before
    assert dead_tmp, "the killed writer left no temporary"
    live = subprocess.Popen([sys.executable, "-c", WRITER, what, str(folder), "live", *extra], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert "WRITING" in live.stdout.readline()
    live_tmp = set(Path(folder).iterdir()) - before - dead_tmp
    assert live_tmp
    return dead_tmp, live, live_tmp


def test_a_new_run_removes_checkpoint_temporaries_of_dead_processes_only(data, tmp_path):
    out = tmp_path / "run"
    dead_tmp, live, live_tmp = writers("checkpoint", out)
    try:
        r = run("train", data, "--out", out, "--epochs", "1", *TINY)
        assert r.exit_code == 0, r.output
        left = set(out.iterdir())
        assert not dead_tmp & left and live_tmp <= left, (dead_tmp, live_tmp, left)
        assert "removed 1 temporary file" in r.stderr, r.stderr
    finally:
        live.kill()
        live.communicate()


def test_the_cache_removes_temporaries_of_dead_processes_only(data, tmp_path):
    from minunet.data import find_data, load_arrays

    cache = tmp_path / "cache"
    dead_tmp, live, live_tmp = writers("cache", cache, str(data))
    try:
        load_arrays(find_data(data).items(), 32, cache)
        left = set(cache.iterdir())
        assert not dead_tmp & left and live_tmp <= left, (dead_tmp, live_tmp, left)
    finally:
        live.kill()
        live.communicate()


def raise_enospc(f, *args, **kwargs):
    f = open(f, "wb") if isinstance(f, str | os.PathLike) else f
    f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_partial_cache_file(data, tmp_path, monkeypatch):
    from minunet.data import find_data, load_arrays
    from minunet.errors import MinunetWarning

    monkeypatch.setattr(np, "save", raise_enospc)
    with pytest.warns(MinunetWarning, match="No space left"):
        arr = load_arrays(find_data(data).items(), 32, tmp_path / "cache")
    assert len(arr) == 12 and list((tmp_path / "cache").iterdir()) == []


# -- a full disk while saving a checkpoint ----------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = np.savez, []

    def full_in_epoch_2(f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 wrote last.npz and best.npz
            raise_enospc(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(np, "savez", full_in_epoch_2)
    r = run("train", data, "--out", out, "--epochs", "2", *TINY)
    assert_one_line_error(r, "No space left", "last.npz", "epoch 1", "--resume")
    assert load_checkpoint(out / "last.npz").meta["state"]["epoch"] == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name] == []
    monkeypatch.undo()
    r = run("train", data, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "last.npz").meta["state"]["epoch"] == 2


# -- an --out that cannot be written: refused before the first step ----------------------


def test_out_that_is_a_file_or_lies_under_a_file(data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert_one_line_error(run("train", data, "--out", tmp_path / "file", *TINY), "file", "--out")
    assert_one_line_error(run("train", data, "--out", tmp_path / "file" / "run", *TINY), "--out")


def test_a_read_only_out_is_refused_before_the_first_step(data, tmp_path, monkeypatch):
    """A resumed run in a folder that became read-only (a real chmod does not stop root: the
    refusal of the filesystem is simulated, for every file created in the folder)."""
    out = tmp_path / "run"
    assert run("train", data, "--out", out, "--epochs", "1", *TINY).exit_code == 0
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == out and flags & os.O_CREAT:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    r = run("train", data, "--out", out, "--resume", "--epochs", "2")
    assert_one_line_error(r, str(out), "Read-only file system")
    assert "epoch" not in r.stdout  # no step was taken
    monkeypatch.undo()
    assert load_checkpoint(out / "last.npz").meta["state"]["epoch"] == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_a_chmod_read_only_out_is_refused(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_one_line_error(run("train", data, "--out", out, "--epochs", "1", *TINY), str(out))
    finally:
        out.chmod(0o755)


# -- settings that cannot work ------------------------------------------------------------


def test_negative_seed(data, tmp_path):
    assert_one_line_error(run("train", data, "--out", tmp_path / "o", *TINY, "--seed", "-1"), "--seed")


def test_a_model_too_big_for_memory_says_how_much_it_would_need(data, tmp_path):
    r = run("train", data, "--out", tmp_path / "o", *TINY, "--base-channels", "100000")
    assert_one_line_error(r, "--base-channels 100000", "would need", "TB")


@pytest.mark.parametrize("base,depth", [(4, 2), (3, 1), (2, 4)])
def test_memory_estimate_counts_weights_adam_and_activations(base, depth):
    from minunet.footprint import layer_rows, training_memory
    from minunet.model import UNet

    model = UNet(1, base, depth)
    rows = layer_rows(1, base, depth, 32)
    assert sum(r.params for r in rows) == model.num_params()
    # every output but the encoder levels' last, whose copies in the [skip | up] buffers are kept instead
    activations = sum(r.activation_bytes for r in rows) - sum(
        r.activation_bytes for r in rows if r.name.startswith("enc") and "conv2" in r.name)
    assert sum(1 for r in rows if r.name.startswith("enc") and "conv2" in r.name) == depth
    need = training_memory(base, depth, 32, batch_size=3, n_images=10)
    assert need.weights == 4 * 4 * model.num_params() and need.activations == 3 * activations
    assert need.images == 10 * 2 * 32 * 32 and need.total == sum(need)


def test_export_to_a_folder(data, tmp_path):
    out = tmp_path / "run"
    assert run("train", data, "--out", out, "--epochs", "1", *TINY).exit_code == 0
    (tmp_path / "models").mkdir()
    assert_one_line_error(run("export", out / "best.npz", tmp_path / "models"), "models", "folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("export", out / "best.npz", tmp_path / "file" / "m.npz"), "m.npz")


def test_on_the_gpu_the_memory_check_reads_the_gpus_memory():
    from types import SimpleNamespace

    from minunet.errors import ConfigError
    from minunet.footprint import check_training_memory

    gpu = SimpleNamespace(mem_info=(0, 8 * 10**9))  # cupy.cuda.Device(): (free, total) bytes
    cupy_backend = SimpleNamespace(name="cupy", xp=SimpleNamespace(cuda=SimpleNamespace(Device=lambda: gpu)))
    check_training_memory(16, 4, 256, 8, 10**6, cupy_backend)  # 131 GB of decoded images stay on the host
    with pytest.raises(ConfigError, match="but the GPU has 8.00 GB"):
        check_training_memory(16, 4, 256, 512, 10, cupy_backend)
