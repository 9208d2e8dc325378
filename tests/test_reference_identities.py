"""Exact identities and edge cases of the reference ops (no finite differences)."""

import numpy as np
import pytest

from minunet.kernels.numpy_ref import NumpyBackend

be = NumpyBackend("float64")
rng = np.random.default_rng(7)


@pytest.mark.parametrize("k", [1, 3])
def test_conv_backward_data_is_the_adjoint_of_conv(k):
    # <conv(x), y> == <x, conv^T(y)> with zero bias: backward's dx is conv^T.
    x = rng.standard_normal((2, 3, 5, 7))
    w = rng.standard_normal((4, 3, k, k))
    y = rng.standard_normal((2, 4, 5, 7))
    out, cache = be.conv2d_forward(x, w, np.zeros(4))
    dx = be.conv2d_backward(y, cache)[0]
    assert np.isclose(np.sum(out * y), np.sum(x * dx), rtol=1e-12)


def test_upconv_is_the_adjoint_of_a_stride2_conv():
    # The 2x2 stride-2 conv with the same weights, conv(y)[n,c,h,w] = sum_{o,i,j} w[c,o,i,j] y[n,o,2h+i,2w+j],
    # written independently here, must be the adjoint of up-conv: <up(x), y> == <x, conv(y)>. The op
    # writes up(x) after the skip's Cs channels, so up(x) and its y are the channels from Cs on.
    Cs = 3
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((3, 2, 2, 2))
    skip = rng.standard_normal((2, Cs, 8, 10))
    y = rng.standard_normal((2, Cs + 2, 8, 10))
    out, cache = be.upconv2x2_forward(x, w, np.zeros(2), skip)
    up, yu = out[:, Cs:], y[:, Cs:]
    conv = np.zeros_like(x)
    for i in range(2):
        for j in range(2):
            conv += np.einsum("co,nohw->nchw", w[:, :, i, j], yu[:, :, i::2, j::2])
    assert np.isclose(np.sum(up * yu), np.sum(x * conv), rtol=1e-12)
    # and backward's dx is exactly that conv
    dx = be.upconv2x2_backward(y, cache)[0]
    np.testing.assert_allclose(dx, conv, rtol=1e-12, atol=1e-12)


def test_conv_matches_a_direct_loop():
    x = rng.standard_normal((2, 2, 4, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((2, 3, 4, 5))
    for n in range(2):
        for o in range(3):
            for h in range(4):
                for c in range(5):
                    ref[n, o, h, c] = b[o] + np.sum(w[o] * xp[n, :, h : h + 3, c : c + 3])
    np.testing.assert_allclose(be.conv2d_forward(x, w, b)[0], ref, rtol=1e-12)


def test_maxpool_ties_go_to_the_first_element():
    x = np.ones((2, 2, 4, 6))
    y, cache = be.maxpool2x2_forward(x)
    assert y.shape == (2, 2, 2, 3) and np.all(y == 1)
    assert np.all(cache.argmax == 0)
    dx = be.maxpool2x2_backward(np.full(y.shape, 3.0), cache)
    expected = np.zeros_like(x)
    expected[:, :, 0::2, 0::2] = 3.0  # the top-left of each window
    np.testing.assert_array_equal(dx, expected)


def test_maxpool_backward_twice_gives_the_same_answer():
    x = rng.standard_normal((2, 3, 4, 4))
    y, cache = be.maxpool2x2_forward(x)
    dy = rng.standard_normal(y.shape)
    first = be.maxpool2x2_backward(dy, cache)
    second = be.maxpool2x2_backward(dy, cache)
    np.testing.assert_array_equal(first, second)
    assert np.count_nonzero(first) == dy.size  # one winner per window
    np.testing.assert_allclose(first.sum(), dy.sum())


def test_maxpool_routes_to_the_maximum():
    x = np.zeros((1, 1, 2, 2))
    x[0, 0, 1, 0] = 5.0
    y, cache = be.maxpool2x2_forward(x)
    assert y[0, 0, 0, 0] == 5.0 and cache.argmax[0, 0, 0, 0] == 2
    dx = be.maxpool2x2_backward(np.ones((1, 1, 1, 1)), cache)
    assert dx[0, 0, 1, 0] == 1.0 and dx.sum() == 1.0


def test_maxpool_refuses_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        be.maxpool2x2_forward(np.zeros((1, 1, 3, 4)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_is_finite_at_huge_logits(dtype):
    b = NumpyBackend(dtype)
    z = np.array([1e4, -1e4, 1e4, -1e4], dtype=dtype).reshape(1, 1, 2, 2)
    y = np.array([1, 0, 0, 1], dtype=dtype).reshape(1, 1, 2, 2)
    loss, dz = b.sigmoid_bce(z, y)
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    # two confident-right pixels cost 0, two confident-wrong cost 1e4 each
    assert loss == pytest.approx(2e4 / 4, rel=1e-6)
    np.testing.assert_allclose(dz.ravel(), np.array([0, 0, 1, -1]) / 4, atol=1e-7)
    s = b.sigmoid(z)
    assert np.all(np.isfinite(s)) and s.dtype == np.dtype(dtype)


def test_bce_matches_the_textbook_formula():
    z = rng.standard_normal((2, 1, 3, 4))
    y = (rng.random(z.shape) > 0.5).astype(float)
    p = 1 / (1 + np.exp(-z))
    expected = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    loss, dz = be.sigmoid_bce(z, y)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(dz, (p - y) / z.size, rtol=1e-12)


def test_float32_stays_float32():
    b = NumpyBackend("float32")
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    bias = np.zeros(2, np.float32)
    y, cache = b.conv2d_forward(x, w, bias, relu=True)
    dx, dw, db = b.conv2d_backward(y, cache)
    assert {a.dtype for a in (y, dx, dw, db)} == {np.dtype(np.float32)}


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        NumpyBackend("float16")
