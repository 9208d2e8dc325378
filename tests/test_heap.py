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
