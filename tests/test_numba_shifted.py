"""The numba backend's shifted-GEMM convolution (``conv_shifted.py``: k*k GEMMs on shifted views of
one padded copy, the low-resolution levels' path) against the NumPy reference, its layout, its
determinism on any number of threads, and the fallback that keeps the NaN rule.

A switch (``conv.shifted_force``) sends every non-direct shape through it, so the small random
shapes of hypothesis reach it whatever the rule says (the rule sends only images up to 64 pixels
wide there).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minunet.kernels.numba import conv, conv_shifted, threads
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.opcases import conv2d
from tests.test_backend_equivalence import (
    IGNORE_INVALID,
    act_in,
    act_out,
    assert_close,
    assert_nonfinite_close,
    backend,
    check_case,
    host,
    rand,
)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.tuples(
    st.integers(1, 3),  # N
    st.integers(1, 20),  # Cin
    st.integers(1, 20),  # Cout
    st.integers(1, 9),  # H
    st.integers(1, 12),  # W
)


@contextmanager
def shifted(force):
    old_s, old_d = conv.shifted_force, conv.direct_force
    conv.shifted_force, conv.direct_force = force, False
    try:
        yield
    finally:
        conv.shifted_force, conv.direct_force = old_s, old_d


@contextmanager
def calls():
    """Counts the calls of the shifted forward (conv_layout: forward and input gradient) and weight
    gradient, so that a test knows the shifted path ran and did not fall back to im2col."""
    seen = {"conv_layout": 0, "weight_grad": 0}
    originals = {name: getattr(conv_shifted, name) for name in seen}

    def counted(name):
        def call(*args, **kwargs):
            seen[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in seen:
        setattr(conv_shifted, name, counted(name))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(conv_shifted, name, fn)


@contextmanager
def col_elems(n):
    """Smaller chunks (threads.COL_ELEMS), so that small shapes run several row chunks."""
    old = threads.COL_ELEMS
    threads.COL_ELEMS = n
    try:
        yield
    finally:
        threads.COL_ELEMS = old


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1 << 19, 64, 7]))
def test_shifted_conv2d(dtype, k, relu, shape, seed, chunk):
    """Against the reference, with the default chunks and with chunks of a row or a few (chunk
    bounds on padding rows and across images), the shifted path forced for all three parts."""
    N, Cin, Cout, H, W = shape
    dims = dict(n=N, cin=Cin, cout=Cout, h=H, w=W)
    with shifted(True), col_elems(chunk), calls() as seen:
        assert conv.use_shifted(Cin, Cout, k, W) and conv.use_shifted_dw(Cin, Cout, k, W)
        check_case("numba", dtype, conv2d(k, relu), dims, seed)
        check_case("numba", dtype, conv2d(k, relu, need_dx=False), dims, seed)
    assert seen["weight_grad"] >= 2 and seen["conv_layout"] >= 3  # ran, no fallback


@pytest.mark.parametrize(("Cout", "k"), [(32, 3), (48, 5)])
def test_shifted_weight_gradient_in_column_blocks(Cout, k):
    """Cout >= 32 splits the weight gradient's columns in two blocks per tap."""
    assert len(conv_shifted.column_blocks(Cout, k)) == 2 * k * k
    with shifted(True), col_elems(300), calls() as seen:
        check_case("numba", "float64", conv2d(k, True), dict(n=2, cin=5, cout=Cout, h=6, w=7), 3)
    assert seen["weight_grad"] == 1


@pytest.mark.parametrize(("total", "row_elems", "elems"), [(68, 17 * 1024, 1 << 19), (4 * 129, 129 * 128, 1 << 19),
                                                          (5, 10, 7), (1, 10, 7), (9, 4, 1 << 19)])
def test_row_chunks_are_even_and_cover_every_row(total, row_elems, elems):
    with col_elems(elems):
        chunks = conv_shifted.row_chunks(total, row_elems)
    assert chunks[0][0] == 0 and chunks[-1][1] == total
    assert all(lo < hi for lo, hi in chunks) and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) % 2 == 0 or total == 1


@pytest.mark.parametrize("k", [3, 5])
def test_layout_places_every_pixel_and_zeros_the_rest(k):
    rng = np.random.default_rng(k)
    N, H, W, C = 3, 4, 5, 2
    x = rng.standard_normal((N, H, W, C)) + 10  # no zeros among the pixels
    B, finite = conv_shifted.to_layout(x, k)
    p, S, R, M, T = conv_shifted.geometry(N, H, W, k)
    assert finite and B.shape == (T, C) and (S, R, M) == (W + p, H + p, N * (H + p) * (W + p))
    expected = np.zeros((T, C))
    for n in range(N):
        for h in range(H):
            for w in range(W):
                expected[p * (S + 1) + (n * R + h) * S + w] = x[n, h, w]
    np.testing.assert_array_equal(B, expected)
    # every tap of every real output reads xpad[n, h+i, w+j] at B[q + i*S + j]
    xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    for n, h, w, i, j in [(0, 0, 0, 0, 0), (1, 3, 4, k - 1, k - 1), (2, 0, 4, k - 1, 0), (2, 3, 0, 0, k - 1)]:
        q = (n * R + h) * S + w
        np.testing.assert_array_equal(B[q + i * S + j], xpad[n, h + i, w + j])


def test_layout_reports_non_finite():
    x = np.ones((2, 3, 3, 4), np.float32)
    assert conv_shifted.to_layout(x, 3)[1]
    for bad in (np.nan, np.inf, -np.inf):
        x2 = x.copy()
        x2[1, 2, 0, 3] = bad
        assert not conv_shifted.to_layout(x2, 3)[1]


@contextmanager
def one_thread():
    """The pool and OpenBLAS on one thread, then both as they were."""
    old_threads, blas = threads._threads, threads._openblas
    old_blas = blas[0]() if blas else None
    threads.set_threads(1)
    try:
        yield
    finally:
        threads.set_threads(threads._workers() if old_threads is None else old_threads)
        threads._threads = old_threads
        if blas:
            blas[1](old_blas)


@pytest.mark.parametrize(("Cin", "Cout", "W"), [(64, 96, 16), (48, 64, 33), (32, 48, 40)])
def test_shifted_is_deterministic_on_any_thread_count_and_matches_im2col(Cin, Cout, W):
    """Several row chunks and column blocks: the same bytes twice and on 1 thread as on 2, and
    within float32 tolerance of im2col + BLAS."""
    dtype, case = "float32", conv2d(3, relu=True)
    be = backend("numba", dtype)
    inputs, upstream = case.make(np.random.default_rng(W), dtype, n=3, cin=Cin, cout=Cout, h=W - 3, w=W)
    inputs["w"] *= 0.3
    upstream = case.comparable(inputs, upstream)  # the two paths sum in different orders
    with shifted(True):
        _, S, R, _, _ = conv_shifted.geometry(3, W - 3, W, 3)
        assert len(conv_shifted.row_chunks(3 * R, S * Cout)) >= 2
        first, again = case.run(be, inputs, upstream), case.run(be, inputs, upstream)
        with one_thread():
            one = case.run(be, inputs, upstream)
    with shifted(False):
        blas = case.run(be, inputs, upstream)
    for a, a2, a1, bl in zip(first, again, one, blas, strict=True):  # outputs, then gradients
        for name in a:
            np.testing.assert_array_equal(a[name], a2[name], err_msg=name)
            np.testing.assert_array_equal(a[name], a1[name], err_msg=f"{name} on one thread")
            assert_close(a[name], bl[name], dtype, name)


@IGNORE_INVALID
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_non_finite_x_keeps_the_reference_nan_positions(dtype):
    """A NaN in x's first column would meet the zero gradient of a garbage output in the shifted
    weight gradient (a NaN where the reference has none): such an x takes im2col, whose NaN
    positions are the reference's."""
    rng = np.random.default_rng(1)
    be, ref = backend("numba", dtype), NumpyBackend(dtype)
    x, w, b = rand(rng, (2, 5, 6, 7), dtype), rand(rng, (8, 5, 3, 3), dtype), rand(rng, 8, dtype)
    x[0, 0, 2, 0] = np.nan  # first column: tap j = 2 never reads it in the reference
    dy = rand(rng, (2, 8, 6, 7), dtype)
    y_ref, c_ref = ref.conv2d_forward(x, w, b)
    _, dw_ref, _ = ref.conv2d_backward(dy, c_ref)
    assert np.isfinite(dw_ref[:, 0, :, 2]).all()
    with shifted(True), calls() as seen:
        y, c = be.conv2d_forward(act_in(be, x), be.asarray(w), be.asarray(b))
        _, dw, _ = be.conv2d_backward(act_in(be, dy), c)
    assert seen["weight_grad"] == 0 and seen["conv_layout"] == 2  # the weight gradient fell back to im2col
    assert_nonfinite_close(act_out(be, y), y_ref, dtype, "y")
    assert_nonfinite_close(host(be, dw), dw_ref, dtype, "dw")


@IGNORE_INVALID
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("relu", [False, True])
def test_non_finite_dy_through_the_shifted_gradients(dtype, relu):
    """A finite x keeps the shifted path; NaN and inf in dy reach dw, db and dx where the reference's
    do (the padding outputs' dz is an exact 0, never a product with dy)."""
    rng = np.random.default_rng(2 + relu)
    be, ref = backend("numba", dtype), NumpyBackend(dtype)
    x, w, b = rand(rng, (2, 5, 6, 7), dtype), rand(rng, (8, 5, 3, 3), dtype), rand(rng, 8, dtype)
    y_ref, c_ref = ref.conv2d_forward(x, w, b, relu=relu)
    dy = rand(rng, y_ref.shape, dtype)
    dy[0, 3, 0, 0], dy[1, 5, 5, 6], dy[1, 1, 2, 3] = np.nan, np.inf, -np.inf  # corners and an inner pixel
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, c_ref)
    with shifted(True), calls() as seen:
        y, c = be.conv2d_forward(act_in(be, x), be.asarray(w), be.asarray(b), relu=relu)
        dx, dw, db = be.conv2d_backward(act_in(be, dy), c)
    assert seen["weight_grad"] == 1
    for what, a, a_ref in [("dx", act_out(be, dx), dx_ref), ("dw", host(be, dw), dw_ref), ("db", host(be, db), db_ref)]:
        assert_nonfinite_close(a, a_ref, dtype, what)


def test_shifted_rule():
    """The measured rule: forward and input gradient up to 64 pixels wide or from 2048 products per
    output (k*k*Cin), the weight gradient up to 32 wide, never where the direct kernels run or for 1x1."""
    assert conv.shifted_force is None
    with shifted(None):  # the rule, with the direct kernels off so every shape is a BLAS shape
        assert conv.use_shifted(1024, 1024, 3, 16) and conv.use_shifted(512, 256, 3, 64)
        assert conv.use_shifted(256, 128, 3, 128) and not conv.use_shifted(128, 256, 3, 128)
        assert not conv.use_shifted(64, 64, 1, 16) and not conv.use_shifted(512, 64, 1, 256)
        assert conv.use_shifted_dw(1024, 512, 3, 32) and not conv.use_shifted_dw(512, 256, 3, 64)
        assert not conv.use_shifted_dw(64, 64, 1, 16)
    for cin, cout, w in [(16, 16, 16), (64, 32, 32)]:  # direct shapes stay direct
        if conv.use_direct(cin, cout, 3, w):
            assert not conv.use_shifted(cin, cout, 3, w)


@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (64, 48, 3, 3), (3, 2, 1, 1), (17, 33, 5, 5)])
def test_weight_layouts(shape):
    w = np.random.default_rng(shape[0]).standard_normal(shape)
    wt = conv.to_taps(w, np.float32)
    np.testing.assert_array_equal(wt, w.transpose(2, 3, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(conv.from_taps(wt, np.float64), wt.transpose(3, 2, 0, 1))
