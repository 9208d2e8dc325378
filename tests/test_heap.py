"""minunet.heap: after keep_freed_memory() a large array comes from the heap, not from its own mmap,
and threads share one heap (each case in a fresh interpreter whose environment sets no allocator
option, so only the call under test changes glibc's defaults)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minunet.heap import ENV_SWITCH, glibc

pytestmark = pytest.mark.skipif(not glibc(), reason="glibc's mallopt only")


def _clean_env(**extra):
    """This environment without anything that sets glibc's allocator or minunet's switch."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", ENV_SWITCH))}
    return {**env, **extra}


# prints the call's result, then whether a 64 MiB array's first byte lies in the [heap] mapping
_CHILD = """
import sys
import numpy as np
from minunet import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "call" else None
a = np.ones(16 * 2**20, dtype=np.float32)
addr = a.ctypes.data
in_heap = False
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        in_heap |= lo <= addr < hi
print(kept, in_heap)
"""


def _run(mode, **env):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                         env=_clean_env(**env))
    return out.stdout.split()


def test_large_arrays_come_from_the_heap_once_called():
    assert _run("call") == ["True", "True"]


def test_without_the_call_glibc_maps_large_arrays_apart():
    # the control: without it, the same array is an mmap of its own (the behaviour heap.py changes)
    assert _run("none") == ["None", "False"]


def test_environment_switch_turns_it_off():
    assert _run("call", MINUNET_KEEP_FREED_MEMORY="0") == ["False", "False"]


# a worker thread allocates; malloc_stats (glibc, to stderr) lists every arena (heap) in use
_THREAD_CHILD = """
import ctypes, sys, threading
import numpy as np
from minunet import heap
if sys.argv[1] == "call":
    heap.keep_freed_memory()
kept = []
t = threading.Thread(target=lambda: kept.append(np.ones(2**18, dtype=np.float32)))
t.start(); t.join()
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.parametrize("mode, arenas", [("call", 1), ("none", 2)])
def test_threads_share_the_one_heap_once_called(mode, arenas):
    out = subprocess.run([sys.executable, "-c", _THREAD_CHILD, mode], capture_output=True, text=True, check=True,
                         env=_clean_env())
    assert out.stderr.count("Arena ") == arenas, out.stderr
