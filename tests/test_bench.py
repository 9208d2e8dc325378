"""The benchmark harness (``minunet bench``, ``benchmarks/gpu_bench.py``): it validates each op
before timing it and its check can fail; the timer, the stepper and the relative error."""

from __future__ import annotations

import time

import numpy as np
import pytest
from click.testing import CliRunner

from minunet.bench import format_op_table, median_ms, minunet_stepper, op_table, random_batch, unet_ops
from minunet.cli import main
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.model import UNet
from minunet.opcases import rel_err

TINY = dict(base=2, depth=1, batch=1, size=16, repeats=1)


def test_op_table_flags_a_wrong_kernel():
    """A max-pool backward off by a factor of 2 is the one row NOT OK; every row is still timed."""

    class Broken(NumpyBackend):
        def maxpool2x2_backward(self, dy, cache):
            return 2 * super().maxpool2x2_backward(dy, cache)

    rows = op_table(Broken("float32"), **TINY)
    assert [r["op"] for r in rows if not r["ok"]] == ["maxpool2x2 2 @16"]
    assert all(r["fwd_ms"] > 0 for r in rows)
    assert format_op_table(rows).count("NOT OK") == 1


def test_op_table_reports_a_crashing_op_and_goes_on():
    class Crashing(NumpyBackend):
        def upconv2x2_forward(self, x, w, b):
            raise RuntimeError("no kernel")

    rows = op_table(Crashing("float32"), **TINY)
    failed = [r for r in rows if "error" in r]
    assert [r["error"] for r in failed] == ["RuntimeError: no kernel"] and not failed[0]["ok"]
    assert sum(r["ok"] for r in rows) == len(rows) - 1


def test_unet_ops_cover_the_step():
    ops = unet_ops(base=4, depth=2, batch=2, size=32)
    count = {}
    for case, _, n in ops:
        name = case.name.split()[0]
        count[name] = count.get(name, 0) + n
    # 2 convs per encoder level, 2 in the bottleneck, 2 per decoder level, the 1x1 head
    assert count == {"conv2d": 11, "maxpool2x2": 2, "upconv2x2": 2, "concat/split": 2, "sigmoid+bce": 1, "adam": 1}
    assert [d["size"] for c, d, _ in ops if c.name == "adam"] == [UNet(1, 4, 2).num_params()]


def test_median_ms_syncs_every_call_and_keeps_to_its_budget():
    synced = []
    ms, n = median_ms(lambda: time.sleep(0.01), lambda: synced.append(1), repeats=100, warmup=2, budget_s=0.05)
    assert 3 <= n < 100 and len(synced) == n + 1  # once after the warm-up, once per timed call
    assert ms >= 10


def test_minunet_stepper_trains():
    x, y = random_batch(2, 8)
    step = minunet_stepper(UNet(1, 2, 1, backend="numpy", seed=0), x, y, lr=1e-2)
    losses = [step() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_rel_err():
    a = np.random.default_rng(0).standard_normal((3, 4))
    b = a + 1e-3 * np.random.default_rng(1).standard_normal((3, 4))
    assert rel_err(a, a) == 0 and rel_err(np.zeros(3), np.zeros(3)) == 0
    assert rel_err(a, b) == rel_err(b, a) > 0
    assert rel_err(1e-9 * a, 1e-9 * b) == pytest.approx(rel_err(a, b))  # scale-free
    assert rel_err(a, b, floor=1e6) < rel_err(a, b)
    assert rel_err(a, a[:2]) == np.inf
    nan = a.copy()
    nan[1, 2] = np.nan
    assert not rel_err(nan, a) <= 1.0


def test_bench_cli_prints_the_table_and_the_step():
    r = CliRunner().invoke(main, ["bench", "--backend", "numpy", "--size", "16", "--base", "2", "--depth", "1",
                                  "--batch-size", "1", "--repeats", "1", "--no-torch"])
    assert r.exit_code == 0, r.output
    assert "conv2d 3x3 +relu" in r.output and "adam" in r.output and "NOT OK" not in r.output
    assert "images/s" in r.output
