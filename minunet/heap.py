"""Keep freed memory in the process for the next training step instead of handing it back to the
operating system (glibc's ``mallopt``; Linux only).

Why: every training step allocates the same large arrays again (activations, caches, gradients:
up to 134 MB each at base 64, batch 4). glibc serves each allocation above its mmap threshold (32
MiB at most, 128 KiB to start) with a fresh ``mmap`` and unmaps it on ``free``, and it returns the
heap's free top to the system once it passes 128 KiB; so each step writes to pages the process has
never touched, and every first touch is a page fault in which the kernel zeroes the page. On a
virtual machine these faults are slow: 24,000-35,000 per base-64 step on one VM, 11-19% of the
step on another (``benchmarks/README.md``, "The allocator keeps freed memory").

``keep_freed_memory()`` turns both off (``M_MMAP_MAX`` 0: every allocation comes from the heap;
``M_TRIM_THRESHOLD`` -1, which glibc reads as the largest size: the heap's free top stays), so the
next step's arrays reuse the pages of this step's, and gives every thread the one heap
(``M_ARENA_MAX`` 1): the kernels' worker threads would otherwise grow heaps of their own, whose
free space the main thread cannot reuse (at base 64 with OpenBLAS's Haswell kernels that cost 95
MiB of peak; the allocations are few and large, so sharing one heap costs no time measured). The
cost: the process's memory does not shrink after its peak (a training or evaluation process comes
back to that peak every step anyway), and the holes a heap keeps add to the peak: 50-60 MiB at
base 16 and 32 measured, 0-30 MiB at base 64 with one heap, and about 55 MiB on the forward pass
alone. ``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` (a huge value) and ``MALLOC_ARENA_MAX=1``
in the environment do the same for any program (PyTorch included).

The command line calls it at start-up; a program using minunet as a library may call it itself,
before it starts threads (a thread that has allocated already keeps its own heap).
``MINUNET_KEEP_FREED_MEMORY=0`` in the environment turns it off. A preloaded allocator (jemalloc,
tcmalloc) ignores these settings.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's malloc.h parameter numbers (stable ABI since glibc 2.0)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NO_TRIM = -1  # mallopt takes an int and glibc stores it as a size_t: -1 is the largest, never reached
ENV_SWITCH = "MINUNET_KEEP_FREED_MEMORY"


def glibc() -> bool:
    """Whether this process runs on glibc (asked of the running C library, not guessed from files)."""
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Serve every allocation from one heap and never trim it (see the module docstring). Returns
    True when glibc took the settings; False elsewhere (not Linux, not glibc, or
    ``MINUNET_KEEP_FREED_MEMORY=0``), having changed nothing. Process-wide and lasting; safe to
    call more than once."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; glibc accepts each of these on any version that has them
    return (mallopt(M_TRIM_THRESHOLD, NO_TRIM) == 1 and mallopt(M_MMAP_MAX, 0) == 1
            and mallopt(M_ARENA_MAX, 1) == 1)
