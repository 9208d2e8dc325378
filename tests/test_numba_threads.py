"""The numba backend's thread pool: ``run_sum`` adds per-chunk partials in chunk order, whatever
order the chunks finish in, and keeps only a window of them alive."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from minunet.kernels.numba import threads


@pytest.fixture(params=[1, 2, 3])
def pool_threads(request, monkeypatch):
    """A pool of 1, 2 or 3 threads for the test (the backend's own pool comes back after it)."""
    monkeypatch.setattr(threads, "_threads", request.param)
    monkeypatch.setattr(threads, "_pool", None)
    yield request.param
    if threads._pool is not None:
        threads._pool.shutdown(wait=True)


def _partials(n, seed=0):
    """float32 partials whose sum depends on the order of the additions (large and small values)."""
    rng = np.random.default_rng(seed)
    scale = np.where(rng.random(n) < 0.3, 1e7, 1.0)
    return [((rng.standard_normal(5) * s).astype(np.float32), np.float64(rng.standard_normal()))
            for s in scale]


def test_run_sum_adds_in_chunk_order(pool_threads):
    parts = _partials(40)
    want0, want1 = parts[0][0].copy(), parts[0][1].copy()
    for a, b in parts[1:]:
        want0 += a
        want1 += b
    rng = np.random.default_rng(1)
    delays = rng.random(len(parts)) * 2e-3  # chunks finish out of order

    def chunk(lo, hi):
        time.sleep(delays[lo])
        a, b = parts[lo]
        return a.copy(), np.array(b)

    got0, got1 = threads.run_sum(chunk, threads.ranges(len(parts), 1))
    assert got0.tobytes() == want0.tobytes()
    assert got1.tobytes() == np.array(want1).tobytes()


def test_run_sum_keeps_a_window_of_partials(pool_threads):
    """At most threads + 1 partials alive at once (the old gather-then-add held all 64)."""
    lock, live, most = threading.Lock(), [0], [0]

    def freed():
        with lock:
            live[0] -= 1

    def chunk(lo, hi):
        a = np.full(3, float(lo))
        weakref.finalize(a, freed)
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(1e-4)
        return (a,)

    (total,) = threads.run_sum(chunk, threads.ranges(64, 1))
    np.testing.assert_array_equal(total, np.full(3, float(sum(range(64)))))
    assert most[0] <= pool_threads + 1, most[0]


def test_run_sum_raises_a_chunks_error(pool_threads):
    def chunk(lo, hi):
        if lo == 5:
            raise ValueError("chunk 5")
        return (np.ones(2),)

    with pytest.raises(ValueError, match="chunk 5"):
        threads.run_sum(chunk, threads.ranges(20, 1))


@pytest.mark.skipif(threads._openblas is None, reason="NumPy is not linked to OpenBLAS")
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_chunks_call_blas_on_one_thread(pool_threads, n_chunks):
    """Even a one-chunk op, which runs in the caller's thread: a multi-threaded product splits its rows
    by the thread count, and with some OpenBLAS kernels the bytes of a row depend on the split."""
    get, set_ = threads._openblas
    before = get()
    set_(2)
    try:
        seen = threads.run(lambda lo, hi: get(), threads.ranges(n_chunks, 1))
        partial = threads.run_sum(lambda lo, hi: (np.array([float(get())]),), threads.ranges(n_chunks, 1))
        assert seen == [1] * n_chunks and partial[0][0] == n_chunks
        assert get() == 2  # the caller's setting is back
    finally:
        set_(before)


def test_a_step_gives_the_same_bytes_on_one_and_two_threads():
    """An MPI rank runs on fewer threads than one process on the whole machine: its forward and
    backward must give the same bytes (a small model, whose convs are single chunks; before the
    fix they differed on OpenBLAS's Haswell kernels)."""
    from minunet.kernels import get_backend
    from minunet.model import UNet

    be = get_backend("numba", "float32")
    x = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    old_threads = threads._threads
    old_blas = threads._openblas[0]() if threads._openblas else None
    results = []
    try:
        for n in (2, 1):
            threads.set_threads(n)
            model = UNet(1, 4, 2, backend=be, seed=1)
            logits = model.forward(be.asarray(x))
            model.backward(logits * 0 + 1)
            results.append([np.array(be.to_host(be.to_nchw(logits)))] + [np.array(g) for g in model.grads.values()])
    finally:
        threads.set_threads(old_blas or 1)  # BLAS as before, and the pool shut down: the next one has the old size
        threads._threads = old_threads
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
