"""The NumPy reference backend against central finite differences (float64).

Each op's backward is a vector-Jacobian product: for a random upstream dy,
the scalar L(x) = <f(x), dy> has gradient backward(dy). Shapes are small,
non-square, with N >= 2 and C >= 2, drawn by hypothesis.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minunet.gradcheck import check_case, check_ops, format_table
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.opcases import MAXPOOL, RELU, SIGMOID_BCE, UPCONV, WEIGHTED_SIGMOID_BCE, conv2d

be = NumpyBackend("float64")
TOL = 1e-6
small = settings(max_examples=12, deadline=None)


def vjp_check(case, dims, seed, edit=None):
    """Compare backward(dy) with the finite-difference gradient of <forward(), dy> for each input."""
    inputs, upstream = case.make(np.random.default_rng(seed), np.float64, **dims)
    if edit:
        edit(inputs)
    rows = check_case(be, case, inputs, upstream, tol=TOL)
    assert rows and all(r.ok for r in rows), "\n" + format_table(rows)


shape = st.tuples(st.integers(2, 3), st.integers(2, 3), st.integers(2, 5), st.integers(2, 6))


@small
@given(shape=shape, cout=st.integers(2, 3), k=st.sampled_from([1, 3]), relu=st.booleans(), seed=st.integers(0, 99))
def test_conv2d_gradients(shape, cout, k, relu, seed):
    n, cin, h, w = shape
    vjp_check(conv2d(k, relu), dict(n=n, cin=cin, cout=cout, h=h, w=w), seed)


@small
@given(n=st.integers(2, 3), c=st.integers(2, 3), h=st.integers(1, 3), w=st.integers(1, 4), seed=st.integers(0, 99))
def test_maxpool_gradients(n, c, h, w, seed):
    vjp_check(MAXPOOL, dict(n=n, c=c, h=2 * h, w=2 * w), seed)  # distinct random values: no ties


@small
@given(shape=shape, cout=st.integers(2, 3), cs=st.integers(1, 3), seed=st.integers(0, 99))
def test_upconv_gradients(shape, cout, cs, seed):
    n, cin, h, w = shape
    vjp_check(UPCONV, dict(n=n, cin=cin, cout=cout, cs=cs, h=h, w=w), seed)


@small
@given(shape=shape, seed=st.integers(0, 99))
def test_relu_gradient(shape, seed):
    def off_the_kink(inputs):
        x = inputs["x"]
        x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink, where the derivative is one-sided

    n, c, h, w = shape
    vjp_check(RELU, dict(n=n, c=c, h=h, w=w), seed, off_the_kink)


@small
@given(shape=shape, cs=st.integers(1, 2), seed=st.integers(0, 99))
def test_upconv_concat_and_split_are_exact_and_adjoint(shape, cs, seed):
    """The skip's channels of the up-conv's output are the skip, bit for bit; the skip's gradient is
    dy's first channels (the split, the concatenation's adjoint): <[skip | up], d> splits exactly."""
    n, cin, h, w = shape
    rng = np.random.default_rng(seed)
    inputs, upstream = UPCONV.make(rng, np.float64, n=n, cin=cin, cout=2, cs=cs, h=h, w=w)
    skip, d = inputs["skip"], upstream["y"]
    y, cache = be.upconv2x2_forward(inputs["x"], inputs["w"], inputs["b"], skip)
    np.testing.assert_array_equal(y[:, :cs], skip)
    dskip = be.upconv2x2_backward(d, cache)[3]
    np.testing.assert_array_equal(dskip, d[:, :cs])
    assert np.isclose(np.sum(y * d), np.sum(skip * dskip) + np.sum(y[:, cs:] * d[:, cs:]), rtol=1e-12)


@small
@given(shape=st.tuples(st.integers(2, 3), st.integers(2, 5), st.integers(2, 6)), seed=st.integers(0, 99))
def test_sigmoid_bce_gradient(shape, seed):
    n, h, w = shape
    vjp_check(SIGMOID_BCE, dict(n=n, h=h, w=w), seed)
    vjp_check(WEIGHTED_SIGMOID_BCE, dict(n=n, h=h, w=w), seed)


def test_check_ops_table_is_all_ok():
    rows = check_ops(be)
    assert len(rows) >= 14
    bad = [r.name for r in rows if not r.ok]
    assert not bad, bad


def test_gradient_check_catches_a_wrong_backward():
    """The checker must be able to fail: a backward that drops the bias gradient is caught."""

    class Broken(NumpyBackend):
        def conv2d_backward(self, dy, cache, need_dx=True):
            dx, dw, db = super().conv2d_backward(dy, cache, need_dx)
            return dx, dw, 0.5 * db

    rows = check_ops(Broken("float64"))
    bad = {r.name for r in rows if not r.ok}
    assert "conv2d 3x3 db" in bad and "conv2d 3x3 dw" not in bad
