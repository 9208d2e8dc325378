"""The NumPy reference backend against central finite differences (float64).

Each op's backward is a vector-Jacobian product: for a random upstream dy,
the scalar L(x) = <f(x), dy> has gradient backward(dy). Shapes are small,
non-square, with N >= 2 and C >= 2, drawn by hypothesis.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minunet.gradcheck import check_ops, numeric_gradient
from minunet.kernels.numpy_ref import NumpyBackend

be = NumpyBackend("float64")
TOL = 1e-6
small = settings(max_examples=12, deadline=None)


def rel_err(a, n):
    return np.max(np.abs(a - n)) / max(np.max(np.abs(a)), np.max(np.abs(n)), 1e-300)


def vjp_check(forward, backward_grads, inputs, seed):
    """Compare backward(dy) with the finite-difference gradient of <forward(), dy> for each input."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(forward().shape)
    analytic = backward_grads(dy)
    for name, x in inputs.items():
        numeric = numeric_gradient(lambda: float(np.sum(forward() * dy)), x)
        err = rel_err(analytic[name], numeric)
        assert err < TOL, f"d{name}: relative error {err:.2e}"


shape = st.tuples(st.integers(2, 3), st.integers(2, 3), st.integers(2, 5), st.integers(2, 6))


@small
@given(shape=shape, cout=st.integers(2, 3), k=st.sampled_from([1, 3]), relu=st.booleans(), seed=st.integers(0, 99))
def test_conv2d_gradients(shape, cout, k, relu, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((cout, shape[1], k, k))
    b = rng.standard_normal(cout)

    def grads(dy):
        _, cache = be.conv2d_forward(x, w, b, relu=relu)
        dx, dw, db = be.conv2d_backward(dy, cache)
        return {"x": dx, "w": dw, "b": db}

    vjp_check(lambda: be.conv2d_forward(x, w, b, relu=relu)[0], grads, {"x": x, "w": w, "b": b}, seed)


@small
@given(n=st.integers(2, 3), c=st.integers(2, 3), h=st.integers(1, 3), w=st.integers(1, 4), seed=st.integers(0, 99))
def test_maxpool_gradients(n, c, h, w, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, 2 * h, 2 * w))  # distinct values: no ties

    def grads(dy):
        return {"x": be.maxpool2x2_backward(dy, be.maxpool2x2_forward(x)[1])}

    vjp_check(lambda: be.maxpool2x2_forward(x)[0], grads, {"x": x}, seed)


@small
@given(shape=shape, cout=st.integers(2, 3), seed=st.integers(0, 99))
def test_upconv_gradients(shape, cout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((shape[1], cout, 2, 2))
    b = rng.standard_normal(cout)

    def grads(dy):
        dx, dw, db = be.upconv2x2_backward(dy, be.upconv2x2_forward(x, w, b)[1])
        return {"x": dx, "w": dw, "b": db}

    vjp_check(lambda: be.upconv2x2_forward(x, w, b)[0], grads, {"x": x, "w": w, "b": b}, seed)


@small
@given(shape=shape, seed=st.integers(0, 99))
def test_relu_gradient(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink, where the derivative is one-sided

    def grads(dy):
        return {"x": be.relu_backward(dy, be.relu_forward(x)[1])}

    vjp_check(lambda: be.relu_forward(x)[0], grads, {"x": x}, seed)


@small
@given(shape=shape, split=st.integers(1, 2), seed=st.integers(0, 99))
def test_concat_split_are_adjoint(shape, split, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((shape[0], split) + shape[2:])
    b = rng.standard_normal(shape)
    d = rng.standard_normal((shape[0], split + shape[1]) + shape[2:])
    y = be.concat_channels(a, b)
    da, db = be.split_channels(d, split)
    assert np.allclose(np.sum(y * d), np.sum(a * da) + np.sum(b * db), rtol=1e-12)
    np.testing.assert_array_equal(be.concat_channels(da, db), d)


@small
@given(shape=st.tuples(st.integers(2, 3), st.just(1), st.integers(2, 5), st.integers(2, 6)), seed=st.integers(0, 99))
def test_sigmoid_bce_gradient(shape, seed):
    rng = np.random.default_rng(seed)
    z = 4 * rng.standard_normal(shape)
    y = (rng.random(shape) > 0.5).astype(np.float64)
    dz = be.sigmoid_bce(z, y)[1]
    numeric = numeric_gradient(lambda: be.sigmoid_bce(z, y)[0], z)
    assert rel_err(dz, numeric) < TOL


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
