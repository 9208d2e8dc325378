"""The CuPy backend's CUDA kernels and host code, checked on the CPU.

No GPU is needed: the whole CUDA source of ``minunet.kernels.cupy``
(``cuda_source(dtype)``, exactly what NVRTC compiles) is compiled with the host
C++ compiler under a small prelude that turns ``__global__``/``__device__``
functions into plain C functions and ``blockIdx``/``threadIdx`` into globals the
test sets. Each launch runs every (block, thread) of a small grid in turn, so the
grid-stride loops, the index math and every gather are exercised exactly as
written. ``CupyBackend`` itself runs unchanged with numpy as its array module
(numpy's matmul stands in for cuBLAS; the API is the same), and every op is
compared with the numpy reference, NaN and inf inputs included (the NaN rule of
``kernels/base.py``).

What this cannot check: NVRTC compilation, cupy's launch plumbing and real GPU
timing; tests marked ``gpu`` and ``benchmarks/gpu_check.sh`` do that on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from minunet.kernels.cupy import CupyBackend, cuda_source, kernels
from minunet.kernels.numpy_ref import NumpyBackend

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler to emulate the CUDA kernels")

PRELUDE = r"""
#include <math.h>
struct EmuDim3 { unsigned int x, y, z; };
static EmuDim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
extern "C" void emu_set(unsigned int b, unsigned int t, unsigned int bd, unsigned int gd) {
    blockIdx.x = b; threadIdx.x = t; blockDim.x = bd; gridDim.x = gd;
}
#define __global__
#define __device__
"""

GRID, BLOCK = 3, 5  # an odd little grid: every grid-stride loop runs several rounds

# the NaN tests make NaN from inf * 0 on purpose, and numpy warns about it
nan_ok = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


_libs = {}


def emu_lib(dtype, tmp_path_factory):
    """The kernels for one dtype, compiled for the host once per session."""
    if dtype not in _libs:
        d = tmp_path_factory.mktemp(f"cuda_emu_{dtype}")
        src, lib = d / "kernels.cpp", d / "kernels.so"
        src.write_text(PRELUDE + cuda_source(dtype))
        subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(src)], check=True)
        _libs[dtype] = ctypes.CDLL(str(lib))
    return _libs[dtype]


class EmulatedCupyBackend(CupyBackend):
    """CupyBackend with numpy as xp and the CUDA kernels run on the host."""

    def __init__(self, lib, dtype, **kw):
        self._lib = lib
        super().__init__(dtype, **kw)

    def _setup(self):
        self.xp = np
        self._kernels = None

    def _launch(self, kernel, total, *args):
        assert kernel in kernels(), f"{kernel.name} is not in the compiled source"
        name = kernel.name
        if total <= 0:
            return
        cargs = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{name}: non-contiguous array argument"
                assert a.dtype in (self.dtype, np.uint8), f"{name}: array of {a.dtype}"
                cargs.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                cargs.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.int64):
                cargs.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.float32) and self.dtype == np.float32:
                cargs.append(ctypes.c_float(float(a)))
            elif isinstance(a, np.float64) and self.dtype == np.float64:
                cargs.append(ctypes.c_double(float(a)))
            else:  # cupy would pass a Python int/float with the wrong C type: refuse it here too
                raise TypeError(f"{name}: argument {a!r} of type {type(a).__name__} is not a numpy scalar")
        fn = getattr(self._lib, name)
        for b in range(GRID):
            for t in range(BLOCK):
                self._lib.emu_set(b, t, BLOCK, GRID)
                fn(*cargs)


@pytest.fixture(scope="module", params=["float32", "float64"])
def be(request, tmp_path_factory):
    return EmulatedCupyBackend(emu_lib(request.param, tmp_path_factory), request.param)


@pytest.fixture
def ref(be):
    return NumpyBackend(be.dtype.name)


def tol(be, loose=1.0):
    return dict(rtol=2e-4 * loose, atol=2e-5 * loose) if be.dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)


def _nchw(be, a):
    return be.to_nchw(a)


def test_every_kernel_is_defined_once_under_its_name():
    # Each CudaKernel's source defines exactly the function it is launched by, and the whole
    # source (both dtypes) defines each kernel once and nothing else.
    names = [k.name for k in kernels()]
    assert len(names) == len(set(names)) == 12
    for k in kernels():
        assert k.source.count('extern "C" __global__') == 1
        assert f'extern "C" __global__ void {k.name}(' in k.source
    for dtype in ("float32", "float64"):
        src = cuda_source(dtype)
        assert src.count('extern "C" __global__') == len(names)
        assert all(src.count(f" void {n}(") == 1 for n in names)


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("budget", [1 << 30, 1])  # one chunk, or one sample per chunk
def test_conv2d(be, ref, k, relu, budget):
    rng = np.random.default_rng(1)
    N, Cin, Cout, H, W = 3, 2, 5, 6, 7
    dt = be.dtype
    x = rng.standard_normal((N, Cin, H, W)).astype(dt)
    w = rng.standard_normal((Cout, Cin, k, k)).astype(dt)
    b = rng.standard_normal(Cout).astype(dt)
    dy = rng.standard_normal((N, Cout, H, W)).astype(dt)
    be.col_budget_bytes = budget
    try:
        y, cache = be.conv2d_forward(be.from_nchw(x), w, b, relu=relu)
        dx, dw, db = be.conv2d_backward(be.from_nchw(dy), cache)
        dx2, _, _ = be.conv2d_backward(be.from_nchw(dy), cache, need_dx=False)
    finally:
        be.col_budget_bytes = 2 << 30
    yr, cr = ref.conv2d_forward(x, w, b, relu=relu)
    dxr, dwr, dbr = ref.conv2d_backward(dy, cr)
    np.testing.assert_allclose(_nchw(be, y), yr, **tol(be))
    np.testing.assert_allclose(_nchw(be, dx), dxr, **tol(be))
    np.testing.assert_allclose(dw, dwr, **tol(be))
    np.testing.assert_allclose(db, dbr, **tol(be))
    assert dx2 is None and dw.shape == w.shape and db.shape == b.shape
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dt


def test_relu(be, ref):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 6)).astype(be.dtype)
    dy = rng.standard_normal(x.shape).astype(be.dtype)
    y, c = be.relu_forward(be.from_nchw(x))
    dx = be.relu_backward(be.from_nchw(dy), c)
    yr, cr = ref.relu_forward(x)
    np.testing.assert_array_equal(_nchw(be, y), yr)
    np.testing.assert_array_equal(_nchw(be, dx), ref.relu_backward(dy, cr))


@pytest.mark.parametrize("ties", [False, True])
def test_maxpool(be, ref, ties):
    rng = np.random.default_rng(3)
    shape = (2, 3, 6, 8)
    x = np.ones(shape, be.dtype) if ties else rng.standard_normal(shape).astype(be.dtype)
    if ties:  # a mix of full ties and partial ties
        x[:, :, ::2, :] = rng.integers(0, 2, size=x[:, :, ::2, :].shape)
    dy = rng.standard_normal((2, 3, 3, 4)).astype(be.dtype)
    y, c = be.maxpool2x2_forward(be.from_nchw(x))
    yr, cr = ref.maxpool2x2_forward(x)
    np.testing.assert_array_equal(_nchw(be, y), yr)
    np.testing.assert_array_equal(c.argmax.transpose(0, 3, 1, 2), cr.argmax)
    for _ in range(2):  # backward twice gives the same answer (no hidden state)
        dx = be.maxpool2x2_backward(be.from_nchw(dy), c)
        np.testing.assert_array_equal(_nchw(be, dx), ref.maxpool2x2_backward(dy, cr))
    with pytest.raises(ValueError):
        be.maxpool2x2_forward(be.from_nchw(np.zeros((1, 1, 3, 4), be.dtype)))


def test_upconv_with_skip(be, ref):
    rng = np.random.default_rng(4)
    N, Cin, Cout, Cs, H, W = 2, 3, 4, 3, 3, 5
    dt = be.dtype
    x = rng.standard_normal((N, Cin, H, W)).astype(dt)
    w = rng.standard_normal((Cin, Cout, 2, 2)).astype(dt)
    b = rng.standard_normal(Cout).astype(dt)
    skip = rng.standard_normal((N, Cs, 2 * H, 2 * W)).astype(dt)
    dy = rng.standard_normal((N, Cs + Cout, 2 * H, 2 * W)).astype(dt)
    y, c = be.upconv2x2_forward(be.from_nchw(x), w, b, be.from_nchw(skip))
    dx, dw, db, dskip = be.upconv2x2_backward(be.from_nchw(dy), c)
    yr, cr = ref.upconv2x2_forward(x, w, b, skip)
    dxr, dwr, dbr, _ = ref.upconv2x2_backward(dy, cr)
    np.testing.assert_array_equal(_nchw(be, y)[:, :Cs], skip)  # the skip's copy is exact
    np.testing.assert_allclose(_nchw(be, y), yr, **tol(be))
    np.testing.assert_allclose(_nchw(be, dx), dxr, **tol(be))
    np.testing.assert_allclose(dw, dwr, **tol(be))
    np.testing.assert_allclose(db, dbr, **tol(be))
    np.testing.assert_array_equal(_nchw(be, dskip), dy[:, :Cs])


def test_sigmoid_bce(be, ref):
    rng = np.random.default_rng(6)
    z = (rng.standard_normal((2, 1, 4, 6)) * 5).astype(be.dtype)
    z.flat[:4] = [1e4, -1e4, 0.0, 80.0]  # extremes stay finite
    y = (rng.random(z.shape) > 0.5).astype(be.dtype)
    loss, dz = be.sigmoid_bce(z, y)
    lr, dzr = ref.sigmoid_bce(z, y)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert loss == pytest.approx(lr, rel=1e-6)
    np.testing.assert_allclose(dz, dzr, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(be.sigmoid(z), ref.sigmoid(z), rtol=1e-6, atol=1e-30)
    # a weight per pixel (the kernel reads w[idx]); weights all 1 give the unweighted loss bit for bit
    w = (rng.random(z.shape) * 4).astype(be.dtype)
    w.flat[4] = 0
    loss_w, dz_w = be.sigmoid_bce(z, y, w)
    lr_w, dzr_w = ref.sigmoid_bce(z, y, w)
    assert loss_w == pytest.approx(lr_w, rel=1e-6)
    np.testing.assert_allclose(dz_w, dzr_w, rtol=1e-6, atol=1e-9)
    assert dz_w.flat[4] == 0
    loss_1, dz_1 = be.sigmoid_bce(z, y, np.ones_like(z))
    assert loss_1 == loss
    np.testing.assert_array_equal(dz_1, dz)
    with pytest.raises(ValueError, match="weights w have shape"):
        be.sigmoid_bce(z, y, w[:1])


def test_adam(be, ref):
    rng = np.random.default_rng(7)
    shape = (4, 3, 3, 3)
    p, g = (rng.standard_normal(shape).astype(be.dtype) for _ in range(2))
    m, v = np.zeros(shape, be.dtype), np.zeros(shape, be.dtype)
    pr, mr, vr = p.copy(), m.copy(), v.copy()
    for t in range(1, 4):
        be.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, t)
        ref.adam_step(pr, g, mr, vr, 1e-3, 0.9, 0.999, 1e-8, t)
    np.testing.assert_allclose(p, pr, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m, mr, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(v, vr, rtol=1e-6, atol=1e-12)


# -- the NaN rule (kernels/base.py): NaN and inf propagate, max-pool: NaN wins ----------------


@nan_ok
def test_relu_keeps_nan_and_its_backward_is_a_product(be, ref):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4, 6)).astype(be.dtype)
    x.flat[[0, 5, 9]] = [np.nan, np.inf, -np.inf]
    dy = rng.standard_normal(x.shape).astype(be.dtype)
    neg = np.flatnonzero(x.ravel() < 0)[:2]
    dy.flat[[0, 5, neg[0], neg[1]]] = [1.0, np.nan, np.nan, np.inf]  # NaN/inf where y <= 0 give NaN
    y, c = be.relu_forward(be.from_nchw(x))
    dx = be.relu_backward(be.from_nchw(dy), c)
    yr, cr = ref.relu_forward(x)
    dxr = ref.relu_backward(dy, cr)
    assert np.isnan(yr.flat[0]) and np.isnan(dxr.flat[neg]).all()  # what the reference does
    np.testing.assert_array_equal(_nchw(be, y), yr)
    np.testing.assert_array_equal(_nchw(be, dx), dxr)


@nan_ok
def test_conv_fused_relu_keeps_a_nan_weight_visible(be, ref):
    """A NaN weight makes its output channel NaN, not a silent dead (all-zero) channel; an inf pixel
    spreads as inf or NaN; backward carries both as the reference does."""
    rng = np.random.default_rng(10)
    N, Cin, Cout, H, W = 2, 3, 4, 5, 6
    dt = be.dtype
    x = rng.standard_normal((N, Cin, H, W)).astype(dt)
    x[1, 0, 2, 3] = np.inf
    w = rng.standard_normal((Cout, Cin, 3, 3)).astype(dt)
    w[2, 1, 0, 2] = np.nan
    b = rng.standard_normal(Cout).astype(dt)
    dy = rng.standard_normal((N, Cout, H, W)).astype(dt)
    y, cache = be.conv2d_forward(be.from_nchw(x), w, b, relu=True)
    dx, dw, db = be.conv2d_backward(be.from_nchw(dy), cache)
    yr, cr = ref.conv2d_forward(x, w, b, relu=True)
    dxr, dwr, dbr = ref.conv2d_backward(dy, cr)
    assert np.isnan(yr[:, 2]).all()
    np.testing.assert_allclose(_nchw(be, y), yr, **tol(be))
    np.testing.assert_allclose(_nchw(be, dx), dxr, **tol(be))
    np.testing.assert_allclose(dw, dwr, **tol(be))
    np.testing.assert_allclose(db, dbr, **tol(be))


@nan_ok
def test_maxpool_nan_wins(be, ref):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 2, 4, 8)).astype(be.dtype)
    nan, inf = np.nan, np.inf
    windows = {  # window (ho, wo) of sample 0, channel 0: values in window order -> the argmax
        (0, 0): ([1, nan, 3, nan], 1),
        (0, 1): ([nan, 2, 3, 4], 0),
        (0, 2): ([1, 2, nan, 5], 2),
        (0, 3): ([inf, nan, inf, 1], 1),
        (1, 0): ([-inf, -inf, -inf, -inf], 0),
        (1, 1): ([1, inf, 2, inf], 1),
        (1, 2): ([1, 2, 3, nan], 3),
        (1, 3): ([nan, nan, nan, nan], 0),
    }
    for (ho, wo), (vals, _) in windows.items():
        x[0, 0, 2 * ho : 2 * ho + 2, 2 * wo : 2 * wo + 2] = np.reshape(vals, (2, 2))
    dy = rng.standard_normal((2, 2, 2, 4)).astype(be.dtype)
    dy[1, 1, 0, 0] = np.nan
    y, c = be.maxpool2x2_forward(be.from_nchw(x))
    yr, cr = ref.maxpool2x2_forward(x)
    for (ho, wo), (vals, arg) in windows.items():
        assert cr.argmax[0, 0, ho, wo] == arg, (vals, cr.argmax[0, 0, ho, wo])  # the reference's rule
    np.testing.assert_array_equal(_nchw(be, y), yr)
    np.testing.assert_array_equal(c.argmax.transpose(0, 3, 1, 2), cr.argmax)
    dx = be.maxpool2x2_backward(be.from_nchw(dy), c)
    np.testing.assert_array_equal(_nchw(be, dx), ref.maxpool2x2_backward(dy, cr))


@nan_ok
def test_upconv_with_skip_carries_nan(be, ref):
    rng = np.random.default_rng(12)
    dt = be.dtype
    x = rng.standard_normal((2, 3, 3, 4)).astype(dt)
    x[0, 1, 2, 0] = np.nan
    w = rng.standard_normal((3, 2, 2, 2)).astype(dt)
    b = rng.standard_normal(2).astype(dt)
    skip = rng.standard_normal((2, 1, 6, 8)).astype(dt)
    skip[1, 0, 3, 2], skip[0, 0, 0, 7] = np.nan, -np.inf
    dy = rng.standard_normal((2, 3, 6, 8)).astype(dt)
    dy[1, 1, 5, 7], dy[0, 0, 2, 2] = np.inf, np.nan  # in the up-conv's channels, in the skip's
    y, c = be.upconv2x2_forward(be.from_nchw(x), w, b, be.from_nchw(skip))
    dx, dw, db, dskip = be.upconv2x2_backward(be.from_nchw(dy), c)
    yr, cr = ref.upconv2x2_forward(x, w, b, skip)
    assert np.isnan(yr[0, 1:, 4:6, 0:2]).all()
    np.testing.assert_array_equal(_nchw(be, y)[:, :1], skip)
    for got, want in zip((_nchw(be, y), _nchw(be, dx), dw, db), (yr, *ref.upconv2x2_backward(dy, cr)[:3])):
        np.testing.assert_allclose(got, want, **tol(be))
    np.testing.assert_array_equal(_nchw(be, dskip), dy[:, :1])


@nan_ok
def test_loss_and_adam_carry_nan(be, ref):
    rng = np.random.default_rng(13)
    z = rng.standard_normal((2, 1, 4, 6)).astype(be.dtype)
    z.flat[:3] = [np.nan, np.inf, -np.inf]
    y = (rng.random(z.shape) > 0.5).astype(be.dtype)
    y.flat[1:3] = [0.0, 1.0]  # inf * 0 is NaN; -inf with target 1 is an infinite loss
    loss, dz = be.sigmoid_bce(z, y)
    lr, dzr = ref.sigmoid_bce(z, y)
    assert np.isnan(loss) and np.isnan(lr)
    np.testing.assert_allclose(dz, dzr, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(be.sigmoid(z), ref.sigmoid(z), rtol=1e-6, atol=1e-30)
    p, g = (rng.standard_normal((3, 4)).astype(be.dtype) for _ in range(2))
    g[1, 2] = np.nan
    m, v = np.zeros_like(p), np.zeros_like(p)
    pr, mr, vr = p.copy(), m.copy(), v.copy()
    be.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1)
    ref.adam_step(pr, g, mr, vr, 1e-3, 0.9, 0.999, 1e-8, 1)
    assert np.isnan(pr[1, 2]) and np.isfinite(np.delete(pr.ravel(), 6)).all()
    for got, want in ((p, pr), (m, mr), (v, vr)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


# -- the optional interface methods ----------------------------------------------------------


def test_sigmoid_bce_device_leaves_the_loss_as_a_0d_float64(be):
    rng = np.random.default_rng(14)
    z = rng.standard_normal((2, 1, 4, 6)).astype(be.dtype)
    y = (rng.random(z.shape) > 0.5).astype(be.dtype)
    loss_dev, dz_dev = be.sigmoid_bce_device(z, y)
    loss, dz = be.sigmoid_bce(z, y)
    assert np.shape(loss_dev) == () and loss_dev.dtype == np.float64
    assert float(loss_dev) == loss
    np.testing.assert_array_equal(dz_dev, dz)
    with pytest.raises(ValueError, match="shape"):
        be.sigmoid_bce_device(z, y[:1])


def test_dtype_refused():
    with pytest.raises(ValueError, match="float32"):  # refused before cupy is even imported
        CupyBackend("float16")


def test_unet_training_step_matches_reference(be, ref):
    """A whole forward, BCE, backward and Adam step of a small U-Net, cupy ops vs reference."""
    from minunet.model import UNet
    from minunet.optim import Adam

    rng = np.random.default_rng(8)
    dt = be.dtype.name
    x = rng.random((2, 1, 16, 16)).astype(dt)
    y = (rng.random((2, 1, 16, 16)) > 0.5).astype(dt)
    models = [UNet(1, 4, 2, backend=b, dtype=dt, seed=3) for b in (be, ref)]
    out = []
    for mdl in models:
        opt = Adam(mdl.params, mdl.grads, lr=1e-3, backend=mdl.backend)
        mdl.zero_grad()
        logits = mdl.forward(x)
        loss, dz = mdl.backend.sigmoid_bce(logits, y)
        mdl.backward(dz)
        grads = {n: np.array(g) for n, g in mdl.grads.items()}
        opt.step()
        out.append((logits, loss, grads, {n: np.array(p) for n, p in mdl.params.items()}))
    (lg, ls, gr, pa), (lgr, lsr, grr, par) = out
    loose = 1.0 if dt == "float32" else 1e-6
    np.testing.assert_allclose(lg, lgr, rtol=1e-4 * loose, atol=1e-5 * loose)
    assert ls == pytest.approx(lsr, rel=1e-5 * loose)
    for n in grr:
        scale = float(np.abs(grr[n]).max()) + 1e-12
        np.testing.assert_allclose(gr[n], grr[n], rtol=1e-3 * loose, atol=1e-4 * loose * scale, err_msg=n)
        np.testing.assert_allclose(pa[n], par[n], rtol=1e-5 * loose, atol=1e-6 * loose, err_msg=n)
