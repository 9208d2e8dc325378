"""The numba backend's direct convolution kernels (few channels at large H*W) against the NumPy reference.

The shape rule sends only the upper U-Net levels (Cout a multiple of 16, and
few channels or wide images: ``conv.use_direct``) to the direct kernels, so the small random shapes of
``test_backend_equivalence`` never reach them. Here a switch forces the path
(``conv.direct_force``) on small images with 16 or 32 output channels, through
every edge case: rows and columns whose taps leave the image, widths smaller
than a register block of pixels, Cin not a multiple of 4 (the one-channel
weight-gradient kernel), Cin a multiple of 16 (the direct input gradient), with
the register blocks of AVX2 and of AVX-512 machines (bitwise equal to each other);
then NaN and inf through the direct kernels, and that the checked-in kernel
source is what its generator writes.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minunet.kernels.numba import conv, conv_direct_gen
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
    interior,
    rand,
)

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.tuples(
    st.integers(1, 2),  # N
    st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 24, 32]),  # Cin (weight-gradient blocks of 16, 8, 4, 1)
    st.sampled_from([16, 32]),  # Cout
    st.integers(1, 9),  # H
    st.integers(1, 21),  # W (a block is 4 or 8 pixels plus the border; the last block overlaps)
)


@contextmanager
def direct(force):
    old = conv.direct_force
    conv.direct_force = force
    try:
        yield
    finally:
        conv.direct_force = old


@contextmanager
def variant(name):
    old = conv.variant_force
    conv.variant_force = name
    try:
        yield
    finally:
        conv.variant_force = old


def _conv_run(be, x, w, b, dy, relu, need_dx=True):
    y, c = be.conv2d_forward(act_in(be, x), be.asarray(w), be.asarray(b), relu=relu)
    dx, dw, db = be.conv2d_backward(act_in(be, dy), c, need_dx=need_dx)
    return act_out(be, y), (act_out(be, dx) if dx is not None else None), host(be, dw), host(be, db)


@pytest.mark.parametrize("blocks", ["narrow", "wide"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_direct_conv2d(blocks, dtype, k, relu, shape, seed):
    N, Cin, Cout, H, W = shape
    dims = dict(n=N, cin=Cin, cout=Cout, h=H, w=W)
    with direct(True), variant(blocks):
        assert conv.use_direct(Cin, Cout, k, W) and conv.use_direct_dw(Cin, Cout, k)
        (_, grads), _, _ = check_case("numba", dtype, conv2d(k, relu), dims, seed)
        (_, no_dx), _, _ = check_case("numba", dtype, conv2d(k, relu, need_dx=False), dims, seed)
    assert no_dx["x"] is None
    np.testing.assert_array_equal(no_dx["w"], grads["w"])


@pytest.mark.parametrize(("Cin", "Cout"), [(1, 16), (16, 16), (32, 16), (64, 32), (128, 64)])
def test_direct_conv2d_large_is_deterministic_and_matches_blas(Cin, Cout):
    """A full-width image (several chunks, every register-block position): the direct path gives the
    same bytes twice and agrees with the im2col + BLAS path to float32 tolerance."""
    dtype, case = "float32", conv2d(3, relu=True, need_dx=Cin > 1)
    be = backend("numba", dtype)
    inputs, upstream = case.make(np.random.default_rng(Cin), dtype, n=2, cin=Cin, cout=Cout, h=70, w=258)
    inputs["w"] *= 0.3
    upstream = case.comparable(inputs, upstream)  # the two paths sum in different orders: off the ReLU's kink
    assert conv.use_direct(Cin, Cout, 3, 258)  # the rule takes these shapes
    first, again = case.run(be, inputs, upstream), case.run(be, inputs, upstream)
    with direct(False):
        blas = case.run(be, inputs, upstream)
    for a, a2, bl in zip(first, again, blas, strict=True):  # outputs, then gradients
        for name in a:
            if a[name] is not None:
                np.testing.assert_array_equal(a[name], a2[name], err_msg=name)
                assert_close(a[name], bl[name], dtype, name)


@pytest.mark.parametrize(("Cin", "Cout", "W"), [(16, 16, 258), (32, 16, 131), (24, 32, 77), (5, 16, 64)])
def test_wide_and_narrow_blocks_give_the_same_bytes(Cin, Cout, W):
    """The AVX-512 register blocks (8 pixels; 16 or 8 input channels of the weight gradient) and the
    AVX2 ones (4 pixels; 4 or 1 channels) sum every output in the same order: the forward, the
    input gradient and the weight gradient are bitwise equal, at widths whose last block overlaps
    the one before it."""
    dtype, case = "float32", conv2d(3, relu=True)
    be = backend("numba", dtype)
    inputs, upstream = case.make(np.random.default_rng(W), dtype, n=2, cin=Cin, cout=Cout, h=9, w=W)
    runs = {}
    for name in ("narrow", "wide"):
        with direct(True), variant(name):
            runs[name] = case.run(be, inputs, upstream)
    for a, b in zip(runs["narrow"], runs["wide"], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_blocks_follow_the_host():
    """The wide blocks on a CPU with AVX-512, the narrow ones otherwise; the kernel choice by Cin."""
    from llvmlite import binding

    assert conv.variant_force is None
    assert conv.VARIANT == ("wide" if binding.get_host_cpu_features().get("avx512f") else "narrow")
    with variant("wide"):
        assert conv.direct_kernel() is conv.conv_direct8
        assert [conv.dw_kernel(c) for c in (32, 24, 12, 3)] == [
            conv.conv_dw_direct16, conv.conv_dw_direct8, conv.conv_dw_direct4, conv.conv_dw_direct1]
    with variant("narrow"):
        assert conv.direct_kernel() is conv.conv_direct
        assert [conv.dw_kernel(c) for c in (32, 24, 12, 3)] == [
            conv.conv_dw_direct4, conv.conv_dw_direct4, conv.conv_dw_direct4, conv.conv_dw_direct1]


def test_direct_rule(monkeypatch):
    """The measured rule in conv.py. Narrow blocks (AVX2): conv_direct for few channels at any width
    and up to 64 outputs from 128 inputs on images at least 64 wide; the direct weight gradient up
    to 32 outputs from 64 inputs. Wide blocks (AVX-512): up to 64 outputs (128 when OpenBLAS runs
    its AVX2 kernels), the weight gradient up to 128 outputs (any). Never for 1x1 or output counts
    that are not a multiple of 16."""
    assert conv.direct_force is None
    with variant("narrow"):
        for cin, cout, w in [(1, 16, 256), (16, 16, 8), (32, 16, 256), (32, 32, 16), (64, 32, 128), (32, 64, 64),
                             (128, 64, 64), (64, 64, 64)]:
            assert conv.use_direct(cin, cout, 3, w), (cin, cout, w)
        for cin, cout, w in [(64, 64, 32), (128, 64, 32), (64, 128, 64), (256, 128, 32), (256, 64, 256),
                             (16, 8, 256), (16, 1, 256)]:
            assert not conv.use_direct(cin, cout, 3, w), (cin, cout, w)
        for cin, cout in [(1, 16), (32, 16), (32, 32), (64, 32)]:
            assert conv.use_direct_dw(cin, cout, 3)
        for cin, cout in [(32, 64), (128, 32), (64, 64), (16, 8)]:
            assert not conv.use_direct_dw(cin, cout, 3)
        assert not conv.use_direct(16, 16, 1, 256) and not conv.use_direct_dw(16, 16, 1)
    with variant("wide"):
        monkeypatch.setattr(conv, "BLAS_AVX512", True)
        assert conv.use_direct(128, 64, 3, 16) and conv.use_direct(256, 64, 3, 8)
        assert not conv.use_direct(64, 128, 3, 32) and not conv.use_direct(16, 8, 3, 256)
        assert conv.use_direct_dw(256, 128, 3) and not conv.use_direct_dw(128, 256, 3)
        monkeypatch.setattr(conv, "BLAS_AVX512", False)
        assert conv.use_direct(256, 128, 3, 64) and not conv.use_direct(128, 256, 3, 32)
        assert conv.use_direct_dw(1024, 1024, 3) and not conv.use_direct_dw(16, 8, 3)
        assert not conv.use_direct(16, 16, 1, 256) and not conv.use_direct_dw(16, 16, 1)


def test_blas_kind_is_read_from_openblas():
    """BLAS_AVX512 follows the kernel family OpenBLAS reports (OPENBLAS_CORETYPE when set)."""
    from minunet.kernels.numba import threads

    assert conv.BLAS_AVX512 == (threads.openblas_corename() in conv.AVX512_BLAS_CORES)


@IGNORE_INVALID
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("Cin", [3, 16])  # 16: the direct input gradient too
def test_direct_conv2d_nonfinite(dtype, relu, Cin):
    """NaN and inf in x, b and dy give the reference's non-finite positions through the direct kernels
    (dy non-finite only away from the border, which the direct kernels skip; see test_backend_equivalence)."""
    rng = np.random.default_rng(Cin + relu)
    be, ref = backend("numba", dtype), NumpyBackend(dtype)
    x, w, b = rand(rng, (2, Cin, 7, 9), dtype), rand(rng, (16, Cin, 3, 3), dtype), rand(rng, 16, dtype)
    x[0, 0, 0, 0], x[1, Cin - 1, 3, 8], x[1, 0, 6, 4] = np.nan, np.inf, -np.inf
    b[5] = np.nan
    y_ref, c_ref = ref.conv2d_forward(x, w, b, relu=relu)
    dy = rand(rng, y_ref.shape, dtype)
    dy[interior(y_ref > 0, 3)] = np.nan
    dy[interior(y_ref == 0 if relu else y_ref < 0, 3)] = np.inf  # with ReLU: where it is off, dy * 0 = NaN
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, c_ref)
    with direct(True):
        y, dx, dw, db = _conv_run(be, x, w, b, dy, relu)
    for what, a, a_ref in [("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref), ("db", db, db_ref)]:
        assert_nonfinite_close(a, a_ref, dtype, what)


@IGNORE_INVALID
@pytest.mark.parametrize("tap", [(0, 0), (1, 2), (2, 1)])
def test_direct_conv2d_nan_weight_reaches_every_pixel_that_reads_it(tap):
    """A NaN weight w[o, c, i, j] makes y[:, o, h, w] NaN wherever that tap reads the image,
    xpad[h+i-1, w+j-1] inside it. The direct kernels skip the zero padding, so the border pixels
    whose tap falls there may stay finite (the reference, which multiplies 0 * NaN, has NaN there):
    those pixels must equal the convolution without that weight."""
    dtype, (i, j) = "float64", tap
    rng = np.random.default_rng(i * 3 + j)
    be, ref = backend("numba", dtype), NumpyBackend(dtype)
    x, w, b = rand(rng, (2, 4, 6, 7), dtype), rand(rng, (16, 4, 3, 3), dtype), rand(rng, 16, dtype)
    w[3, 1, i, j] = np.nan
    with direct(True):
        y, _ = be.conv2d_forward(act_in(be, x), w, b, relu=True)
    y = act_out(be, y)
    H, W = x.shape[2:]
    reads = np.zeros((H, W), bool)  # the output pixels where tap (i, j) reads inside the image
    reads[max(0, 1 - i) : min(H, H + 1 - i), max(0, 1 - j) : min(W, W + 1 - j)] = True
    assert np.isnan(y[:, 3][:, reads]).all()
    w0 = w.copy()
    w0[3, 1, i, j] = 0
    y0, _ = ref.conv2d_forward(x, w0, b, relu=True)
    finite = ~np.isnan(y)
    assert finite[:, np.arange(16) != 3].all()
    assert_close(y[finite], y0[finite], dtype, "y without the NaN weight")


def test_generated_kernels_are_current():
    """conv_direct_kernels.py is exactly what conv_direct_gen.py writes: edit the templates, then
    regenerate with `python -m minunet.kernels.numba.conv_direct_gen`."""
    assert conv_direct_gen.OUTPUT.read_text() == conv_direct_gen.source()
