"""Without cupy or a CUDA device, the cupy backend fails with one clear line (the CLI exits 2 on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minunet.kernels import get_backend
from minunet.kernels.cupy_gpu import GpuUnavailableError, cuda_available

pytestmark = pytest.mark.skipif(cuda_available(), reason="a CUDA device answers here")


def test_module_imports_without_cupy():
    # A fresh interpreter: importing the module must not import cupy.
    code = "import sys, minunet.kernels.cupy_gpu; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_backend_cupy_raises_with_install_hint():
    with pytest.raises(GpuUnavailableError) as info:
        get_backend("cupy")
    msg = str(info.value)
    assert "\n" not in msg
    assert 'pip install "minunet[gpu]"' in msg or "no CUDA device" in msg
    assert isinstance(info.value, RuntimeError)


def test_auto_does_not_pick_cupy():
    assert cuda_available() is False
