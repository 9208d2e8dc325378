"""minunet.heap: after keep_freed_memory() a large array comes from the heap, not from its own mmap
(each case in a fresh interpreter, so the test process keeps its allocator as it was)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

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
                         env={**os.environ, **env})
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
    out = subprocess.run([sys.executable, "-c", _THREAD_CHILD, mode], capture_output=True, text=True, check=True)
    assert out.stderr.count("Arena ") == arenas, out.stderr
