"""Without cupy or a CUDA device, the cupy backend fails with one clear line (the CLI exits 2 on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minunet.errors import ConfigError
from minunet.kernels import get_backend, open_backend
from minunet.kernels.cupy import NO_CUPY, GpuUnavailableError, cuda_status

HAS_GPU, WHY_NOT = cuda_status()
pytestmark = pytest.mark.skipif(HAS_GPU, reason="a CUDA device answers here")


def test_package_imports_without_cupy():
    # A fresh interpreter: importing the package (and its source builder) must not import cupy.
    code = "import sys, minunet.kernels.cupy as c; c.cuda_source('float32'); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_backend_cupy_raises_with_install_hint():
    with pytest.raises(GpuUnavailableError) as info:
        get_backend("cupy")
    msg = str(info.value)
    assert "\n" not in msg
    assert 'pip install "minunet[gpu]"' in msg or "no CUDA device" in msg
    assert "--backend numba" in msg
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one line and exits 2


def test_auto_does_not_pick_cupy_and_says_why():
    assert HAS_GPU is False and WHY_NOT
    be, note = open_backend("auto")
    assert be.name != "cupy"
    if WHY_NOT == NO_CUPY:  # a CPU install: falling back is expected, no note on every run
        assert note is None
    else:  # cupy is there but cannot start: say why
        assert WHY_NOT in note
