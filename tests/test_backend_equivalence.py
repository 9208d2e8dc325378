"""Fast backends against the NumPy reference (the spec): every op, forward and backward.

Each test runs one case of ``minunet.opcases`` with the same random inputs
through the backend under test and the reference, in float64 (to 1e-10) and
float32 (to 1e-4), as ``opcases.rel_err`` (relative to the larger tensor's
largest value). Activations go in through ``from_nchw`` and come back through
``to_nchw``, so a backend's internal layout (NHWC for numba) is invisible here.
The ``cupy`` parameter runs only where a CUDA device answers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minunet.kernels import get_backend
from minunet.kernels.cupy import cuda_status
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.model import UNet
from minunet.opcases import ADAM, CONCAT, MAXPOOL, RELU, SIGMOID, SIGMOID_BCE, UPCONV, conv2d, rel_err

BACKENDS = [
    "numba",
    pytest.param(
        "cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_status()[0], reason=cuda_status()[1])]
    ),
]
DTYPES = ["float64", "float32"]
RTOL = {"float64": 1e-10, "float32": 1e-4}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_backends = {}


def backend(name, dtype):
    """One instance per (name, dtype) for the whole session (kernels compile once)."""
    if (name, dtype) not in _backends:
        _backends[name, dtype] = get_backend(name, dtype)
    return _backends[name, dtype]


def host(be, a):
    """A backend array (parameter-shaped or NCHW) -> numpy."""
    return np.asarray(be.to_host(a))


def assert_close(actual, expected, dtype, what=""):
    """rel_err(actual, expected) <= rtol by dtype, shapes equal."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:g}"


def check_case(name, dtype, case, dims, seed, edit=None, exact=False):
    """Run ``case`` on backend ``name`` and on the reference with the same inputs (drawn by
    ``case.make``, then changed by ``edit(inputs, upstream, rng)``): every output and gradient
    must agree (bit for bit when ``exact``). Returns the backend's (outputs, grads), inputs, upstream."""
    rng = np.random.default_rng(seed)
    inputs, upstream = case.make(rng, dtype, **dims)
    if edit:
        edit(inputs, upstream, rng)
    got = case.run(backend(name, dtype), inputs, upstream)
    want = case.run(NumpyBackend(dtype), inputs, upstream)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for k in w:
            if w[k] is None:
                assert g[k] is None, f"{case.name} {k}: expected None"
            elif exact:
                np.testing.assert_array_equal(g[k], w[k], err_msg=f"{case.name} {k}")
            else:
                assert_close(g[k], w[k], dtype, f"{case.name} {k}")
    return got, inputs, upstream


shapes = st.tuples(
    st.integers(1, 3),  # N
    st.integers(1, 10),  # Cin (>= 8 takes the slice-copy im2col and the BLAS 1x1 path)
    st.integers(1, 5),  # Cout
    st.integers(1, 5).map(lambda h: 2 * h),  # H (even, for pool and up-conv)
    st.integers(1, 6).map(lambda w: 2 * w),  # W
)


@pytest.fixture(params=BACKENDS)
def name(request):
    return request.param


# -- convolution -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("relu", [False, True])
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_conv2d(name, dtype, k, relu, shape, seed):
    N, Cin, Cout, H, W = shape
    dims = dict(n=N, cin=Cin, cout=Cout, h=H, w=W)
    (_, grads), _, _ = check_case(name, dtype, conv2d(k, relu), dims, seed)
    (_, no_dx), _, _ = check_case(name, dtype, conv2d(k, relu, need_dx=False), dims, seed)
    assert no_dx["x"] is None
    assert_close(no_dx["w"], grads["w"], dtype, "dw (need_dx=False)")


# -- ReLU ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_relu(name, dtype, shape, seed):
    N, C, _, H, W = shape

    def kink(inputs, upstream, rng):
        inputs["x"][0, 0, 0, 0] = 0.0  # the kink: gradient 0, as the reference

    check_case(name, dtype, RELU, dict(n=N, c=C, h=H, w=W), seed, kink)


# -- max-pool ------------------------------------------------------------------


def _pool_both(name, dtype, dims, seed, edit):
    (_, grads), inputs, upstream = check_case(name, dtype, MAXPOOL, dims, seed, edit)
    want = MAXPOOL.run(NumpyBackend(dtype), inputs, upstream)[1]
    # routing is exact: the same positions receive the same values
    np.testing.assert_array_equal(grads["x"] != 0, want["x"] != 0)
    # backward twice from the same cache gives the same answer (no state consumed)
    be = backend(name, dtype)
    up = MAXPOOL.to_backend(be, upstream)
    _, cache = MAXPOOL.forward(be, MAXPOOL.to_backend(be, inputs))
    for _ in range(2):
        np.testing.assert_array_equal(MAXPOOL.to_host(be, MAXPOOL.backward(be, cache, up))["x"], grads["x"])
    return grads["x"], upstream["y"]


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), levels=st.sampled_from([0, 2, 3]))
def test_maxpool(name, dtype, shape, seed, levels):
    """levels=0: distinct random values; 2 or 3: values from a tiny set, so windows tie often."""
    N, C, _, H, W = shape

    def edit(inputs, upstream, rng):
        if levels:
            inputs["x"] = rng.integers(0, levels, inputs["x"].shape).astype(dtype)
        upstream["y"] += 3.0  # nonzero, so routing is visible

    _pool_both(name, dtype, dict(n=N, c=C, h=H, w=W), seed, edit)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_all_equal_routes_to_first(name, dtype):
    def edit(inputs, upstream, rng):
        inputs["x"] = np.full((2, 3, 4, 6), 0.5, dtype)
        upstream["y"] = np.arange(1, 1 + 2 * 3 * 2 * 3, dtype=dtype).reshape(2, 3, 2, 3)

    dx, dy = _pool_both(name, dtype, dict(n=2, c=3, h=4, w=6), 0, edit)
    np.testing.assert_array_equal(dx[:, :, ::2, ::2], dy)  # top-left of every window


# -- up-conv -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_upconv2x2(name, dtype, shape, seed):
    N, Cin, Cout, H, W = shape
    check_case(name, dtype, UPCONV, dict(n=N, cin=Cin, cout=Cout, h=H // 2, w=W // 2), seed)


# -- skip connection -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_concat_split(name, dtype, shape, seed):
    N, Ca, Cb, H, W = shape
    check_case(name, dtype, CONCAT, dict(n=N, ca=Ca, cb=Cb, h=H, w=W), seed, exact=True)


# -- output and loss ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 10.0, 1e4]))
def test_sigmoid_bce(name, dtype, shape, seed, scale):
    N, _, _, H, W = shape

    def edit(inputs, upstream, rng):
        z = inputs["z"] = (rng.standard_normal(inputs["z"].shape) * scale).astype(dtype)
        z.flat[0], z.flat[-1] = 1e4, -1e4  # extremes: finite loss, exact gradient

    dims = dict(n=N, h=H, w=W)
    check_case(name, dtype, SIGMOID, dims, seed, edit)
    (out, grads), inputs, _ = check_case(name, dtype, SIGMOID_BCE, dims, seed, edit)
    be = backend(name, dtype)
    loss, _ = be.sigmoid_bce(be.asarray(inputs["z"]), be.asarray(inputs["y"]))
    assert isinstance(loss, float) and np.isfinite(out["loss"])
    assert np.all(np.isfinite(grads["z"]))


# -- optimizer ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(size=st.integers(1, 200), seed=st.integers(0, 2**31 - 1), lr=st.sampled_from([1e-3, 0.1]))
def test_adam_step(name, dtype, size, seed, lr):
    """Three steps, each with a new gradient, on the backend and the reference."""
    rng = np.random.default_rng(seed)
    be, ref = backend(name, dtype), NumpyBackend(dtype)
    inputs, _ = ADAM.make(rng, dtype, size=size)
    inputs["lr"] = lr
    on_be, on_ref = ADAM.to_backend(be, inputs), ADAM.to_backend(ref, inputs)
    for t in range(1, 4):
        g = rng.standard_normal(size).astype(dtype)
        on_be.update(g=be.asarray(g), t=t)
        on_ref.update(g=g, t=t)
        got, want = ADAM.forward(be, on_be)[0], ADAM.forward(ref, on_ref)[0]
    got, want = ADAM.to_host(be, got), ADAM.to_host(ref, want)
    for k in "mvp":
        assert_close(got[k], want[k], dtype, k)


# -- the whole network -----------------------------------------------------------


def _train_step(model, x, y):
    """zero_grad, forward, fused loss, backward: returns (loss, logits, grads) on the host."""
    be = model.backend
    model.zero_grad()
    logits = model.forward(be.asarray(x))
    loss, dz = be.sigmoid_bce(logits, be.asarray(y))
    model.backward(dz)
    return loss, host(be, logits), {k: host(be, g).copy() for k, g in model.grads.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [2, 3])
def test_unet_matches_reference(name, dtype, depth):
    rng = np.random.default_rng(depth)
    x = rng.random((2, 1, 32, 48)).astype(dtype)
    y = (rng.random(x.shape) > 0.6).astype(dtype)
    ref = UNet(1, 4, depth, backend="numpy", dtype=dtype, seed=3)
    fast = UNet(1, 4, depth, backend=backend(name, dtype), dtype=dtype, seed=3)
    for n in ref.params:
        np.testing.assert_array_equal(host(fast.backend, fast.params[n]), ref.params[n])
    loss_ref, logits_ref, grads_ref = _train_step(ref, x, y)
    loss, logits, grads = _train_step(fast, x, y)
    assert_close(loss, loss_ref, dtype, "loss")
    assert_close(logits, logits_ref, dtype, "logits")
    assert list(grads) == list(grads_ref)
    for n in grads_ref:
        assert_close(grads[n], grads_ref[n], dtype, n)


def test_unet_deterministic(name):
    """Two fresh runs of forward, loss, backward and Adam give identical bytes."""
    from minunet.optim import Adam

    rng = np.random.default_rng(7)
    x = rng.random((3, 1, 32, 32)).astype("float32")
    y = (rng.random(x.shape) > 0.5).astype("float32")
    runs = []
    for _ in range(2):
        be = get_backend(name, "float32")
        model = UNet(1, 4, 2, backend=be, dtype="float32", seed=5)
        opt = Adam(model.params, model.grads, lr=1e-2, backend=be)
        out = []
        for _step in range(2):
            loss, logits, grads = _train_step(model, x, y)
            opt.step()
            out.append((loss, logits.tobytes(), {k: g.tobytes() for k, g in grads.items()}))
        out.append({k: host(be, p).tobytes() for k, p in model.params.items()})
        runs.append(out)
    assert runs[0] == runs[1]


def test_numba_many_chunks_matches_reference(monkeypatch):
    """Tiny chunk sizes force every numba op through many chunks on the thread pool (the real
    shapes' path), including the in-order sums of per-chunk dw/db partials; results must match
    the reference and be bitwise identical run to run."""
    from minunet.kernels import numba_cpu

    monkeypatch.setattr(numba_cpu, "_COL_ELEMS", 300)
    monkeypatch.setattr(numba_cpu, "_ELEMS", 64)
    rng = np.random.default_rng(11)
    x = rng.random((3, 1, 32, 16)).astype("float64")
    y = (rng.random(x.shape) > 0.5).astype("float64")
    ref = UNet(1, 4, 2, backend="numpy", dtype="float64", seed=2)
    loss_ref, logits_ref, grads_ref = _train_step(ref, x, y)
    outs = []
    for _ in range(2):
        fast = UNet(1, 4, 2, backend=numba_cpu.NumbaBackend("float64"), dtype="float64", seed=2)
        outs.append(_train_step(fast, x, y))
    loss, logits, grads = outs[0]
    assert_close(loss, loss_ref, "float64", "loss")
    assert_close(logits, logits_ref, "float64", "logits")
    for n in grads_ref:
        assert_close(grads[n], grads_ref[n], "float64", n)
    assert outs[0][1].tobytes() == outs[1][1].tobytes()
    assert all(outs[0][2][n].tobytes() == outs[1][2][n].tobytes() for n in grads_ref)
