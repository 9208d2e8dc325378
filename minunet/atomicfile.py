"""Files written whole or not at all, and the temporaries of writers that died.

``atomic_write(path, write)`` writes through a temporary file beside ``path`` and renames it
(``os.replace``): a crash, a kill or a full disk mid-write leaves the previous ``path`` intact.
A write that fails removes its temporary; a process that is killed cannot, so every temporary's
name says which process writes it:

    .<name>.<host>_<pid>_<random>.tmp          e.g.  .last.npz.node7_4121_9f3ac1d2.tmp

and ``remove_stale_temporaries(folder)`` deletes those of processes of this host that no longer
run. A temporary of a live process (another rank of a distributed run, another training filling
the same cache) or of another host (which this one cannot ask) is never removed.

Checkpoints (checkpoint.py), the run folder's files (runfolder.py, charts.py) and the decoded-image
cache (data/decode.py) are all written this way.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"  # no '.' or '_': the name parses
TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)_(?P<pid>\d+)_[0-9a-f]{8}\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (``os.kill(pid, 0)``: a process of another user counts).

    On Windows ``os.kill`` would terminate the process, so every process counts as alive there."""
    if os.name == "nt":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def temp_path(path: Path) -> Path:
    """A new temporary's name beside ``path``, naming this host and process."""
    return path.parent / f".{path.name}.{HOST}_{os.getpid()}_{secrets.token_hex(4)}.tmp"


def atomic_write(path, write, fsync: bool = True) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    ``fsync`` flushes it to the disk before the rename (a checkpoint must survive a power cut; a cache
    entry that does not is detected as damaged and rebuilt). Any error, ENOSPC included, removes the
    temporary and propagates."""
    path = Path(path)
    tmp = temp_path(path)
    # Mode 0o666 and no chmod: the kernel applies the umask, so the file gets the permissions
    # of any file the user writes (tempfile.mkstemp would make it 0o600). O_EXCL: never reuse a name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporaries in ``folder`` left by processes of this host that no longer run; return them."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if m and m["host"] == HOST and not pid_alive(int(m["pid"])):
            try:
                os.unlink(entry.path)
            except OSError:  # gone already (another process cleaning up), or not ours to remove
                continue
            removed.append(Path(entry.path))
    return removed
