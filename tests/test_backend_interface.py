"""The backend interface (kernels/base.py) and the one way in, ``open_backend``.

Every reason a backend cannot start is one ConfigError line that says what to
do; ``auto`` says why it fell back to the CPU; the optional interface methods
have CPU defaults with the same contract as the GPU's.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import minunet.kernels.base as base
from minunet.errors import ConfigError
from minunet.kernels import Backend, get_backend, open_backend
from minunet.kernels.cupy import NO_CUPY, CupyBackend, cuda_status
from minunet.kernels.numba import NumbaBackend
from minunet.kernels.numpy_ref import NumpyBackend

NUMBA_MODULE = "minunet.kernels.numba"  # the module open_backend imports for "numba"


def test_interface_module_imports_nothing_from_minunet():
    tree = ast.parse(Path(base.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("minunet"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("minunet") for a in node.names)


def test_backends_implement_every_op():
    for cls in (NumpyBackend, NumbaBackend, CupyBackend):
        assert issubclass(cls, Backend) and not cls.__abstractmethods__, cls

    class Incomplete(NumpyBackend):
        relu_forward = Backend.relu_forward  # an op left abstract: the class cannot be built

    with pytest.raises(TypeError, match="relu_forward"):
        Incomplete()


@pytest.mark.parametrize(
    ("name", "dtype", "words"),
    [
        ("tpu", "float32", ["unknown backend 'tpu'", "choose auto, numpy, numba, cupy"]),
        ("numpy", "float16", ["float16", "float32 or float64"]),
        ("numpy", "no-such-type", ["backend numpy"]),
    ],
)
def test_bad_name_or_dtype_is_one_config_error_line(name, dtype, words):
    with pytest.raises(ConfigError) as info:
        open_backend(name, dtype)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_names_are_case_insensitive_and_get_backend_drops_the_note():
    be, note = open_backend("NumPy", "float64")
    assert isinstance(be, NumpyBackend) and be.dtype == np.float64 and note is None
    assert isinstance(get_backend("numpy"), NumpyBackend)


def test_numba_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, NUMBA_MODULE, None)  # the import now fails as if numba were absent
    with pytest.raises(ConfigError, match="pip install numba, or choose --backend numpy"):
        open_backend("numba")
    be, note = open_backend("auto", "float64")
    has_gpu, why = cuda_status()
    if has_gpu:
        assert be.name == "cupy"
    else:
        assert isinstance(be, NumpyBackend) and be.dtype == np.float64
        assert "numba is not available" in note and note.endswith("using numpy")
        assert (why in note) == (why != NO_CUPY)  # why there is no GPU, unless cupy is simply not installed


def _fake_cupy(monkeypatch, get_device_count):
    """A stand-in cupy module whose device query does what the test says."""

    class CUDARuntimeError(RuntimeError):
        pass

    def count():
        return get_device_count(CUDARuntimeError)

    runtime = types.SimpleNamespace(getDeviceCount=count, CUDARuntimeError=CUDARuntimeError)
    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", mod)


def test_cuda_status_says_why_there_is_no_gpu(monkeypatch):
    def no_driver(err):
        raise err("cudaErrorInsufficientDriver: CUDA driver version is insufficient\nmore detail")

    _fake_cupy(monkeypatch, no_driver)
    assert cuda_status() == (False, "no CUDA device answered (cudaErrorInsufficientDriver: CUDA driver "
                                    "version is insufficient)")
    with pytest.raises(ConfigError) as info:
        open_backend("cupy")
    assert "\n" not in str(info.value) and "check the NVIDIA driver" in str(info.value)
    be, note = open_backend("auto")
    assert be.name != "cupy" and "cudaErrorInsufficientDriver" in note

    _fake_cupy(monkeypatch, lambda err: 0)
    assert cuda_status() == (False, "no CUDA device found")


def test_cuda_status_does_not_hide_an_unexpected_error(monkeypatch):
    def broken(err):
        raise KeyError("a bug, not a missing GPU")

    _fake_cupy(monkeypatch, broken)
    with pytest.raises(KeyError):
        cuda_status()


def test_cuda_status_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert cuda_status() == (False, "CuPy is not installed")
    with pytest.raises(ConfigError, match=r'pip install "minunet\[gpu\]".*or choose --backend numba'):
        open_backend("cupy")


def test_cli_turns_a_backend_that_cannot_start_into_one_line(monkeypatch):
    from minunet.cli import main

    monkeypatch.setitem(sys.modules, "cupy", None)
    r = CliRunner().invoke(main, ["bench", "--backend", "cupy", "--no-ops", "--no-torch"])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: the cupy backend cannot start"), err
    monkeypatch.setitem(sys.modules, NUMBA_MODULE, None)
    r = CliRunner().invoke(main, ["gradcheck", "--backend", "numba"])
    assert r.exit_code == 2 and "pip install numba" in r.stderr, r.output


# -- the optional methods' CPU defaults ------------------------------------------------------


def test_default_synchronize_and_upload_async():
    be = NumpyBackend("float32")
    assert be.synchronize() is None
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 1, 4, 4)), rng.random((2, 1, 4, 4)) > 0.5  # float64 and bool on the host
    xb, yb = be.upload_async(x, y)
    for got, want in ((xb, x), (yb, y)):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float32))
    one = be.upload_async(x)
    assert isinstance(one, np.ndarray) and one.shape == x.shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_sigmoid_bce_device_matches_sigmoid_bce(dtype):
    be = NumpyBackend(dtype)
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((2, 1, 4, 6)) * 3).astype(dtype)
    y = (rng.random(z.shape) > 0.5).astype(dtype)
    loss_dev, dz_dev = be.sigmoid_bce_device(z, y)
    loss, dz = be.sigmoid_bce(z, y)
    assert isinstance(loss_dev, np.ndarray) and loss_dev.shape == () and loss_dev.dtype == np.float64
    assert float(loss_dev) == loss
    np.testing.assert_array_equal(dz_dev, dz)
