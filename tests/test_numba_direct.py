"""The numba backend's direct convolution kernels (few channels at large H*W) against the NumPy reference.

The shape rule sends only the full-resolution U-Net levels (Cin, Cout <= 32,
Cout a multiple of 16) to the direct kernels, so the small random shapes of
``test_backend_equivalence`` never reach them. Here a switch forces the path
(``_direct_force``) on small images with 16 or 32 output channels, through
every edge case: rows and columns whose taps leave the image, widths smaller
than a register block of pixels, Cin not a multiple of 4 (the one-channel
weight-gradient kernel), Cin a multiple of 16 (the direct input gradient).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minunet.kernels import numba_cpu
from minunet.opcases import conv2d
from tests.test_backend_equivalence import assert_close, backend, check_case

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.tuples(
    st.integers(1, 2),  # N
    st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 32]),  # Cin
    st.sampled_from([16, 32]),  # Cout
    st.integers(1, 9),  # H
    st.integers(1, 13),  # W (a block is 4 pixels plus the border)
)


@contextmanager
def direct(force):
    old = numba_cpu._direct_force
    numba_cpu._direct_force = force
    try:
        yield
    finally:
        numba_cpu._direct_force = old


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_direct_conv2d(dtype, k, relu, shape, seed):
    N, Cin, Cout, H, W = shape
    dims = dict(n=N, cin=Cin, cout=Cout, h=H, w=W)
    with direct(True):
        assert numba_cpu._use_direct(Cin, Cout, k)
        (_, grads), _, _ = check_case("numba", dtype, conv2d(k, relu), dims, seed)
        (_, no_dx), _, _ = check_case("numba", dtype, conv2d(k, relu, need_dx=False), dims, seed)
    assert no_dx["x"] is None
    np.testing.assert_array_equal(no_dx["w"], grads["w"])


@pytest.mark.parametrize("Cin", [1, 16, 32])
def test_direct_conv2d_large_is_deterministic_and_matches_blas(Cin):
    """A full-width image (several chunks, every register-block position): the direct path gives the
    same bytes twice and agrees with the im2col + BLAS path to float32 tolerance."""
    dtype, case = "float32", conv2d(3, relu=True, need_dx=Cin > 1)
    be = backend("numba", dtype)
    inputs, upstream = case.make(np.random.default_rng(Cin), dtype, n=2, cin=Cin, cout=16, h=70, w=258)
    inputs["w"] *= 0.3
    assert numba_cpu._use_direct(Cin, 16, 3)  # the rule takes these shapes
    first, again = case.run(be, inputs, upstream), case.run(be, inputs, upstream)
    with direct(False):
        blas = case.run(be, inputs, upstream)
    for a, a2, bl in zip(first, again, blas, strict=True):  # outputs, then gradients
        for name in a:
            if a[name] is not None:
                np.testing.assert_array_equal(a[name], a2[name], err_msg=name)
                assert_close(a[name], bl[name], dtype, name)


def test_direct_rule():
    """Direct for the full-resolution level's shapes, im2col + BLAS for the deeper ones and 1x1."""
    assert numba_cpu._direct_force is None
    for cin, cout in [(1, 16), (16, 16), (32, 16), (16, 32), (32, 32)]:
        assert numba_cpu._use_direct(cin, cout, 3)
    for cin, cout in [(32, 64), (64, 64), (128, 64), (16, 8), (16, 1)]:
        assert not numba_cpu._use_direct(cin, cout, 3)
    assert not numba_cpu._use_direct(16, 16, 1)
