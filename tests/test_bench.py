"""The benchmark harness (``minunet bench``, ``benchmarks/gpu_bench.py``): it validates each op
before timing it and its check can fail; the timer, the stepper and the relative error; the FLOP
count, the sgemm share, and the width table (fresh processes, PyTorch present, faked or absent)."""

from __future__ import annotations

import functools
import json
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner

from minunet import bench, bench_widths
from minunet.bench import (
    add_sgemm_share,
    blas_setting,
    format_op_table,
    forward_flops,
    median_ms,
    minunet_stepper,
    op_table,
    random_batch,
    sgemm_ceiling,
    step_flops,
    unet_ops,
)
from minunet.bench_widths import measure_fresh
from minunet.cli import main
from minunet.footprint import layer_rows
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
        def upconv2x2_forward(self, x, w, b, skip):
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
    assert count == {"conv2d": 11, "maxpool2x2": 2, "upconv2x2": 2, "sigmoid+bce": 1, "adam": 1}
    assert all(d["cs"] == d["cout"] for c, d, _ in ops if c.name.startswith("upconv2x2"))  # [skip | up]: equal halves
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


def test_step_flops_match_a_hand_count():
    """U-Net base 2, depth 1 on 1x4x4 images: widths 2 and 4, the bottleneck at 2x2.
    FLOPs = 2 x multiply-adds = 2 * H * W * Cin * Cout * k * k per conv."""
    per_image = (2 * 16 * 1 * 2 * 9  # enc0.conv1 1->2 @4x4
                 + 2 * 16 * 2 * 2 * 9  # enc0.conv2 2->2 @4x4
                 + 2 * 4 * 2 * 4 * 9  # bottleneck.conv1 2->4 @2x2
                 + 2 * 4 * 4 * 4 * 9  # bottleneck.conv2 4->4 @2x2
                 + 2 * 16 * 4 * 2  # dec0.up 4->2, 2x2 stride 2: each of the 4x4 outputs is 4 multiply-adds per cout
                 + 2 * 16 * 4 * 2 * 9  # dec0.conv1 (2+2)->2 @4x4
                 + 2 * 16 * 2 * 2 * 9  # dec0.conv2 2->2 @4x4
                 + 2 * 16 * 2 * 1)  # head 1x1 2->1
    assert per_image == 7232
    assert forward_flops(base=2, depth=1, batch=3, size=4) == 3 * per_image
    assert step_flops(base=2, depth=1, batch=3, size=4) == 3 * 3 * per_image
    # the same count as minunet summary's layer table (whose pooling rows count comparisons, left out here)
    convs = sum(r.flops for r in layer_rows(1, 16, 4, 256) if not r.name.startswith("pool"))
    assert forward_flops(base=16, depth=4, batch=8, size=256) == 8 * convs
    assert round(step_flops() / 1e9) == 145  # the default step: the "about 144 GFLOP"


def test_sgemm_ceiling_and_share():
    s = sgemm_ceiling(n=128, repeats=1)
    assert s["n"] == 128 and s["gflops"] == pytest.approx(2 * 128**3 / s["ms"] / 1e6)
    row = add_sgemm_share(dict(fwd_gflops=50.0, bwd_gflops=None, gflops=25.0, ms=3.0), ceiling_gflops=200.0)
    assert row == dict(fwd_gflops=50.0, bwd_gflops=None, gflops=25.0, ms=3.0,
                       fwd_pct_sgemm=25.0, bwd_pct_sgemm=None, pct_sgemm=12.5)
    assert add_sgemm_share(dict(gflops=25.0), None)["pct_sgemm"] is None  # no ceiling (a GPU backend)


def test_blas_setting_records_openblas_coretype(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert blas_setting()["OPENBLAS_CORETYPE"] == "Haswell"
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert blas_setting()["OPENBLAS_CORETYPE"] == "unset"


@pytest.fixture
def small_sgemm(monkeypatch):
    """The CLI's sgemm ceiling on 256x256 once: the code path, without seconds of BLAS per test."""
    monkeypatch.setattr(bench, "sgemm_ceiling", functools.partial(sgemm_ceiling, n=256, repeats=1))


def strict_loads(text):
    """json.loads that refuses NaN and Infinity (which Python's json would accept)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_widths_without_torch_run_each_width_in_a_fresh_process(monkeypatch, small_sgemm):
    monkeypatch.setattr(bench_widths, "torch_importable", lambda: False)
    r = CliRunner().invoke(main, ["bench", "--backend", "numpy", "--size", "16", "--depth", "1", "--repeats", "1",
                                  "--widths", "2,4", "--json"])
    assert r.exit_code == 0, r.output
    out = strict_loads(r.stdout)
    assert out["mode"] == "step" and out["blas"]["OPENBLAS_CORETYPE"] and out["sgemm"]["gflops"] > 0
    assert out["numba_direct_blocks"] in ("wide", "narrow")
    assert [(w["base"], w["batch"]) for w in out["widths"]] == [(2, 8), (4, 8)]
    for w in out["widths"]:
        assert w["gflop"] == pytest.approx(step_flops(w["base"], 1, 8, 16) / 1e9)
        assert w["minunet_ms"] > 0 and w["minunet_peak_mb"] >= w["minunet_rss_before_mb"] > 0
        assert w["gflops"] == pytest.approx(w["gflop"] / w["minunet_ms"] * 1e3)
        assert w["pct_sgemm"] == pytest.approx(100 * w["gflops"] / out["sgemm"]["gflops"])
        assert w["torch_ms"] is None and w["torch_peak_mb"] is None and w["ratio"] is None


def test_inference_times_the_forward_pass_alone(monkeypatch, small_sgemm):
    monkeypatch.setattr(bench_widths, "torch_importable", lambda: False)
    r = CliRunner().invoke(main, ["bench", "--backend", "numpy", "--size", "16", "--depth", "1", "--base", "2",
                                  "--repeats", "1", "--inference", "--json"])
    assert r.exit_code == 0, r.output
    (w,) = strict_loads(r.stdout)["widths"]
    assert w["mode"] == "inference" and w["base"] == 2 and w["batch"] == 8
    assert w["gflop"] == pytest.approx(forward_flops(2, 1, 8, 16) / 1e9)  # the forward's, not 3x
    assert w["minunet_ms"] > 0 and w["torch_ms"] is None


def test_widths_table_with_a_fake_torch(monkeypatch, small_sgemm):
    """Both sides faked: the table's arithmetic, the default batches, '-' and null for what is missing."""
    calls = []

    def fake(impl, mode, base, depth, batch, size, repeats, backend):
        calls.append((impl, mode, base, batch))
        if impl == "torch" and base == 64:
            return {"error": "torch (exit status -9): killed"}
        ms = {"minunet": 300.0, "torch": 200.0}[impl]
        peak = math.nan if impl == "torch" and base == 32 else 1000.0 + base
        return dict(ms=ms, peak_rss_mb=peak, rss_before_mb=100.0, version="PyTorch 9.9 (fake)")

    monkeypatch.setattr(bench_widths, "torch_importable", lambda: True)
    monkeypatch.setattr(bench_widths, "measure_fresh", lambda **kw: fake(**kw))
    args = ["bench", "--size", "64", "--widths", "16,32,64", "--repeats", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "1 measurement(s) failed: torch (exit status -9): killed" in r.output, r.output
    assert [c for c in calls if c[0] == "minunet"] == [("minunet", "step", 16, 8), ("minunet", "step", 32, 8),
                                                       ("minunet", "step", 64, 4)]
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["base", "batch", "GFLOP"])
    row16, row64 = lines[head + 1].split(), lines[head + 3].split()
    gflop16 = step_flops(16, 4, 8, 64) / 1e9
    assert row16[:8] == ["16", "8", f"{gflop16:.1f}", "300", "200", "1.50x", "1016", "1016"]
    assert row16[8] == f"{gflop16 / 0.3:.1f}"
    assert row64[:8] == ["64", "4", f"{step_flops(64, 4, 4, 64) / 1e9:.1f}", "300", "-", "-", "1064", "-"]
    assert "PyTorch 9.9 (fake)" in r.stdout

    calls.clear()
    r = CliRunner().invoke(main, [*args, "--batch-size", "2", "--json"])
    out = strict_loads(r.stdout)  # the NaN peak became null
    assert [w["batch"] for w in out["widths"]] == [2, 2, 2] and {c[3] for c in calls} == {2}
    assert out["widths"][1]["torch_peak_mb"] is None and out["widths"][1]["ratio"] == 1.5
    assert out["widths"][2]["torch_error"] == "torch (exit status -9): killed"

    calls.clear()
    r = CliRunner().invoke(main, [*args, "--no-torch"])
    assert r.exit_code == 0 and {c[0] for c in calls} == {"minunet"}, r.output


def test_measure_fresh_reports_a_failed_process():
    got = measure_fresh(impl="tensorflow", mode="step", base=2, depth=1, batch=1, size=16, repeats=1)
    assert got["error"].startswith("tensorflow (exit status 1): ValueError: impl must be"), got
