"""The numba backend's threads: a pool of one worker per core, chunks, single-threaded BLAS.

Every op cuts its work into chunks of image rows (or of flat elements) whose
boundaries depend only on the shapes (``ranges``), and ``run`` shares the chunks
out to the pool. A chunk runs serial ``nogil`` Numba kernels and NumPy's BLAS
on one thread (``single_threaded_blas``), with its scratch arrays private to
the thread (``tls_buffer``). There is no fork/join barrier per chunk, so a busy
machine (other processes on the cores) slows an op in proportion instead of
stalling every parallel region; on a shared 2-core machine this measured 30x
faster than Numba ``prange`` loops around multi-threaded BLAS calls.

Determinism: each chunk writes only its own rows, and a reduction computes one
partial per chunk and adds the partials in chunk order (``run_sum``). Which
thread ran a chunk does not matter, so the same inputs give the same bytes run
after run.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba
import numpy as np

# Every kernel of the backend: compiled once and cached on disk, plain IEEE arithmetic,
# and the GIL released so the pool's threads run kernels at the same time.
JIT = dict(cache=True, fastmath=False, nogil=True)

# Work per chunk. Conv: about 2**19 im2col values (2 MB in float32) per chunk;
# elementwise ops: about 2**18 values. Read at call time (``threads.ELEMS``), so
# a test can shrink them to force many chunks.
COL_ELEMS = 1 << 19
ELEMS = 1 << 18


def ranges(total, per):
    """[(lo, hi)] covering range(total) in steps of per (>= 1): the chunk boundaries."""
    per = max(1, int(per))
    return [(lo, min(total, lo + per)) for lo in range(0, total, per)]


def flat_ranges(n):
    """Chunks of about ELEMS elements over a flat array of n."""
    return ranges(n, ELEMS)


# -- the pool ----------------------------------------------------------------

_pool = None
_pool_pid = None
_pool_lock = threading.Lock()
_threads = None  # set_threads: the pool's size; None: NUMBA_NUM_THREADS (one per core)


def _workers() -> int:
    return _threads or max(1, int(numba.config.NUMBA_NUM_THREADS))


def set_threads(n: int):
    """Use ``n`` threads from now on: the pool's size, and NumPy's OpenBLAS outside the pool (the numpy
    backend's products). For processes sharing a machine (ranks of an MPI job), so that processes x
    threads fits its cores. Results do not change: chunk boundaries depend on the shapes alone."""
    global _pool, _threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    with _pool_lock:
        _threads = int(n)
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
    if _openblas is not None:
        with _blas_lock:
            if _blas_depth[0]:  # inside single_threaded_blas: the setting it restores afterwards
                _blas_depth[1] = int(n)
            else:
                _openblas[1](int(n))


def _get_pool():
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the parent's threads
        with _pool_lock:
            if _pool is None or _pool_pid != os.getpid():
                _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="minunet-numba")
                _pool_pid = os.getpid()
    return _pool


def run(fn, chunks):
    """[fn(*c) for c in chunks], the chunks shared out to the pool (in the caller's thread if one).

    A chunk's BLAS calls run on one thread in every case, the caller's thread included: a
    multi-threaded OpenBLAS product splits its rows by the thread count, and with some kernel
    sets (OpenBLAS's Haswell kernels on AMD Zen 3, measured) a row's result depends on where the
    split puts it, so a one-chunk op would give other bytes on 1 thread (an MPI rank) than on 2."""
    with single_threaded_blas():
        if len(chunks) <= 1 or _workers() == 1:
            return [fn(*c) for c in chunks]
        return list(_get_pool().map(lambda c: fn(*c), chunks))


def run_sum(fn, chunks):
    """Elementwise sums of the tuples of arrays fn(*c) returns per chunk, added in chunk order:
    (dw, db) = ((p0 + p1) + p2) + ... with p_i = fn(*chunks[i]), the chunks run on the pool.

    The order of the additions is fixed by the chunks alone, so the sums are the same bytes
    whichever thread ran a chunk. Each partial is added, and freed, as soon as those before it
    are in, and at most ``threads + 1`` chunks are in flight: the weight gradient of a wide conv
    at low resolution has one (9*Cin, Cout) partial per chunk, and keeping them all until the
    last chunk held 2.3 GB (the 128 chunks of the 1024 -> 512 conv at 32x32, batch 4)."""
    total = None

    def add(part):
        nonlocal total
        if total is None:
            total = [a.copy() for a in part]  # a copy: fn may return views of its own buffers
        else:
            for acc, a in zip(total, part, strict=True):
                acc += a

    if len(chunks) <= 1 or _workers() == 1:
        with single_threaded_blas():  # as in run: the same bytes on any number of threads
            for c in chunks:
                add(fn(*c))
        return tuple(total)
    pool, window = _get_pool(), deque()
    with single_threaded_blas():
        try:
            for c in chunks:
                window.append(pool.submit(fn, *c))
                if len(window) > _workers():
                    add(window.popleft().result())
            while window:
                add(window.popleft().result())
        finally:  # a chunk raised: the ones not started yet are dropped
            for f in window:
                f.cancel()
    return tuple(total)


# -- BLAS on one thread inside the pool ----------------------------------------


def openblas_libraries():
    """ctypes handles of NumPy's bundled OpenBLAS (none for a NumPy built on another BLAS)."""
    libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


def openblas_corename():
    """The kernel family NumPy's bundled OpenBLAS runs ('Haswell', 'SkylakeX', ...; it follows
    ``OPENBLAS_CORETYPE`` when set, the CPU otherwise), or None for a NumPy built on another BLAS."""
    for lib in openblas_libraries():
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def _find_openblas():
    """ctypes handles (get, set) of the thread count of NumPy's bundled OpenBLAS, or None."""
    for lib in openblas_libraries():
        for get, set_ in (
            ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"),
        ):
            if hasattr(lib, get) and hasattr(lib, set_):
                getter, setter = getattr(lib, get), getattr(lib, set_)
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                return getter, setter
    return None


_openblas = _find_openblas()
_blas_lock = threading.Lock()
_blas_depth = [0, 0]  # [ops inside single_threaded_blas now, thread count to restore]


@contextmanager
def single_threaded_blas():
    """BLAS on one thread while the pool's workers each call it; the caller's setting comes back after
    the last op that asked for it (ops running at once from several threads nest correctly).

    Without NumPy's OpenBLAS (another BLAS build) this does nothing: results
    are the same, only slower from oversubscribed threads."""
    if _openblas is None:
        yield
        return
    get, set_ = _openblas
    with _blas_lock:
        if _blas_depth[0] == 0:
            _blas_depth[1] = get()
            set_(1)
        _blas_depth[0] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth[0] -= 1
            if _blas_depth[0] == 0:
                set_(_blas_depth[1])


# -- scratch buffers -------------------------------------------------------------

_tls = threading.local()


def tls_buffer(shape, dtype, name="scratch"):
    """A scratch array private to the calling thread: a view of one flat buffer per (name, dtype)
    that grows to the largest request and is reused across calls (never returned to the caller).
    Distinct names give distinct buffers, for a kernel that needs two at once."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    dtype = np.dtype(dtype)
    need = int(np.prod(shape))
    key = (name, dtype.str)
    flat = bufs.get(key)
    if flat is None or flat.size < need:
        flat = bufs[key] = np.empty(need, dtype)
    return flat[:need].reshape(shape)
