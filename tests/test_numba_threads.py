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
