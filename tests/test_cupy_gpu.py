"""GPU-only checks of the cupy backend beyond the shared equivalence suite (run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
from benchscripts import load_script

from minunet.kernels.cupy import cuda_status

HAS_GPU, WHY_NOT = cuda_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=WHY_NOT)]


@pytest.fixture(scope="module")
def be():
    from minunet.kernels.cupy import CupyBackend

    return CupyBackend("float32")


def test_arrays_live_on_the_gpu(be):
    import cupy

    from minunet.model import UNet

    model = UNet(1, 4, 2, backend=be, seed=0)
    assert all(isinstance(p, cupy.ndarray) for p in model.params.values())
    out = model.forward(np.zeros((1, 1, 16, 16), np.float32))
    assert isinstance(out, cupy.ndarray) and out.shape == (1, 1, 16, 16)
    assert isinstance(be.to_host(out), np.ndarray)


def test_loss_on_device_matches_float(be):
    import cupy

    rng = np.random.default_rng(0)
    z = be.asarray(rng.standard_normal((2, 1, 8, 8)) * 3)
    y = be.asarray(rng.random((2, 1, 8, 8)) > 0.5)
    loss_dev, dz_dev = be.sigmoid_bce_device(z, y)
    loss, dz = be.sigmoid_bce(z, y)
    assert isinstance(loss_dev, cupy.ndarray) and loss_dev.shape == ()
    assert float(loss_dev) == loss
    assert bool((dz_dev == dz).all())


def test_chunked_conv_matches_and_repeats_bit_for_bit(be):
    """im2col in one chunk or one sample per chunk: same result; each twice: identical bits."""
    from minunet.kernels.cupy import CupyBackend

    rng = np.random.default_rng(1)
    x = be.from_nchw(rng.standard_normal((3, 5, 12, 10)).astype(np.float32))
    w = be.asarray(rng.standard_normal((7, 5, 3, 3)) * 0.2)
    b = be.asarray(rng.standard_normal(7))
    dy = be.from_nchw(rng.standard_normal((3, 7, 12, 10)).astype(np.float32))
    outs = []
    for budget in (2 << 30, 1, 2 << 30, 1):
        bk = CupyBackend("float32", col_budget_bytes=budget)
        y, c = bk.conv2d_forward(x, w, b, relu=True)
        dx, dw, db = bk.conv2d_backward(dy, c)
        outs.append([bk.to_host(a) for a in (y, dx, dw, db)])
    for a, b_ in zip(outs[0], outs[2], strict=True):
        assert a.tobytes() == b_.tobytes()
    for a, b_ in zip(outs[1], outs[3], strict=True):
        assert a.tobytes() == b_.tobytes()
    for a, b_ in zip(outs[0], outs[1], strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


def test_upload_async_delivers_every_batch_intact(be):
    """Batches uploaded while earlier steps still run arrive intact and in order."""
    import cupy

    rng = np.random.default_rng(2)
    batches = [(rng.random((4, 1, 64, 64), dtype=np.float32), rng.random((4, 1, 64, 64), dtype=np.float32))
               for _ in range(6)]
    sums = []
    xb, yb = be.upload_async(*batches[0])
    for k in range(len(batches)):
        big = cupy.ones((2048, 2048), np.float32)
        _ = big @ big  # keep the compute stream busy so the next copy overlaps it
        sums.append((xb * 2 + yb).sum(dtype=np.float64))  # the "step" that reads batch k
        if k + 1 < len(batches):
            xb, yb = be.upload_async(*batches[k + 1])
    be.synchronize()
    for k, (x, y) in enumerate(batches):
        assert float(sums[k]) == pytest.approx(float((x.astype(np.float64) * 2 + y).sum()), rel=1e-6)


def test_unet_matches_pytorch_twin():
    """The same weights in minunet (cupy) and in a PyTorch twin: same loss, logits, grads, Adam step."""
    pytest.importorskip("torch")
    gpu_bench = load_script("gpu_bench")
    ok, errs = gpu_bench.check_twin(base=4, depth=2, batch=2, size=32)
    assert ok, errs
