"""The run folder (``--out``) that ``minunet train`` writes and ``--resume`` reads:

    config.json   every setting (under "train"), plus what was found (backend, data, split sizes)
    split.json    the training and validation file lists (the held-out set)
    history.csv   one row per epoch: losses, val Dice/IoU, lr, seconds (validation included), images/s
                  (training images per second of training)
    curves.png    loss and Dice per epoch (charts.draw_curves)
    last.npz      weights + Adam + position, every epoch and on Ctrl-C or SIGTERM (resumable; checkpoint.py)
    best.npz      the same, at the epoch with the best validation score (metrics.selection_score:
                  mean Dice for lungs, dice_nonempty * (1 - fp_image_rate) for infection)
    .lock         while a training writes here: its PID, host and start time (lock_run_folder)

Every file is written whole or not at all (atomicfile.atomic_write).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from datetime import datetime
from pathlib import Path

from minunet.atomicfile import HOST, atomic_write, pid_alive
from minunet.errors import ConfigError, OutputError

LOCK_NAME = ".lock"

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_dice_pooled", "val_dice_nonempty",
                  "val_fp_image_rate", "val_score", "lr", "seconds", "images_per_s")


@contextlib.contextmanager
def lock_run_folder(out):
    """Hold the run folder ``out`` (an existing folder) for one training: yields None, or the record of a
    stale lock it cleared.

    The lock is the file ``out/.lock``, created with O_CREAT | O_EXCL (atomic: of two processes, one
    creates it), holding {"pid", "host", "started"}; it is removed on the way out. Another lock refuses
    with a ConfigError naming its PID and host, unless it is stale: taken on this host by a process that
    no longer runs (killed, or the machine restarted), which is cleared. A lock of another host is never
    guessed stale. In a distributed run only rank 0 takes it: the other ranks write nothing in ``out``.
    (Two trainings started in the same instant over a stale lock could both clear it: the lock guards
    against a second run started by hand or by a scheduler, not against a race of microseconds.)"""
    path = Path(out) / LOCK_NAME
    cleared = None
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            held = _read_lock(path)
            if held is None:
                continue
            if held["host"] != HOST or pid_alive(held["pid"]) or cleared is not None:
                raise ConfigError(
                    f"{out} is in use by another training (PID {held['pid']} on {held['host']}, started "
                    f"{held['started']}): wait for it to end, or choose another --out; if that process no longer "
                    f"runs, delete {path}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            cleared = held
        except OSError as e:
            raise OutputError(f"cannot write in the run folder {out} ({e.strerror or e}): choose another --out") \
                from None
    mine = {"pid": os.getpid(), "host": HOST, "started": datetime.now().isoformat(timespec="seconds")}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(mine))
    try:
        yield cleared
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == mine:
                os.unlink(path)


def _read_lock(path: Path) -> dict | None:
    """A lock's record, or None when it is gone (its training just ended). Its creator writes it just
    after creating the file: an empty or partial file is read again for up to a second before it is
    called damaged."""
    for _ in range(20):
        try:
            held = json.loads(path.read_text())
            if isinstance(held, dict) and isinstance(held.get("pid"), int) and isinstance(held.get("host"), str):
                return {"started": "at an unknown time", **held}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise ConfigError(f"{path} (the lock of a training writing in {path.parent}) is unreadable: if no training "
                      "runs there, delete it")


def write_run_info(out: Path, run_info: dict, split_json: dict):
    """config.json (the settings and what was found) and split.json (the file lists)."""
    atomic_write(out / "config.json", lambda f: f.write((json.dumps(run_info, indent=2) + "\n").encode()))
    atomic_write(out / "split.json", lambda f: f.write((json.dumps(split_json, indent=1) + "\n").encode()))


def check_resumable(out):
    """Raise ConfigError unless ``out`` holds a run to resume (a last.npz)."""
    if not (Path(out) / "last.npz").is_file():
        raise ConfigError(f"there is no run to resume in {out} (no last.npz): start one without --resume")


def load_run_info(out) -> dict:
    """A run folder's whole config.json (settings under "train", the resolved "backend", ...), for --resume."""
    path = Path(out) / "config.json"
    check_resumable(out)
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or not isinstance(info["train"], dict):
            raise ValueError
        return info
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path} is missing or damaged: cannot resume; start a new run with another --out") from None


def load_run_config(out) -> dict:
    """The settings saved in a run folder's config.json (for --resume)."""
    return load_run_info(out)["train"]


def load_run_split(out: Path) -> dict | None:
    """The run's split.json, or None when it is missing or damaged."""
    try:
        return json.loads((out / "split.json").read_text())
    except (OSError, ValueError):
        return None


def write_history(path: Path, rows):
    """history.csv: one row per epoch, the HISTORY_FIELDS columns."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in HISTORY_FIELDS})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
