"""Benchmarks, in the style of llm.c's ``dev/cuda``: validate each kernel against the reference, then time it.

``op_table`` takes every distinct op of the U-Net step at its real shapes
(default: base 16, depth 4, batch 8, 1x256x256; the cases of ``opcases.py``),
checks the backend's forward and backward against the NumPy reference
(float32, on a cropped copy of the shape: batch <= 2, H and W <= 64, so the
reference stays quick), then times forward and backward and reports ms and
GFLOP/s. ``train_step`` times the whole training step (forward, fused
sigmoid+BCE, backward, Adam) in images/s and reports the process's peak
memory; when PyTorch is importable it also times the same network and step in
PyTorch (channels_last, same thread count), the two interleaved so both see
the same machine load. PyTorch is never a dependency.

``bench_widths.py`` measures the step (or the forward pass alone) at several
base widths, each measurement in a fresh process. ``sgemm_ceiling`` times a
large float32 product in the same run: the share of it that an op or a step
reaches says how close it comes to this machine's BLAS, whatever the machine. FLOPs count the
convolutions and up-convolutions only, a multiply-add as 2 (``forward_flops``);
a training step counts 3x its forward (``step_flops``).

The timer (``median_ms``), the steppers (``minunet_stepper`` here,
``torch_twin.torch_stepper``) and ``op_table`` are shared with
``benchmarks/gpu_bench.py``. Nothing here prints: results are dicts;
``progress(message)`` is called between measurements when given.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np

from minunet.kernels import get_backend
from minunet.kernels.numba.threads import openblas_corename
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.model import UNet
from minunet.opcases import ADAM, MAXPOOL, SIGMOID_BCE, UPCONV, conv2d, rel_err
from minunet.optim import Adam

FLOAT32_RTOL = 1e-4
CROP = {"n": 2, "h": 64, "w": 64, "size": 4096}  # validation shape: the real one, cut down to these


def median_ms(fn, sync=None, repeats=5, warmup=1, budget_s=None):
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls,
    and how many calls were timed.

    ``sync()`` (a backend's or PyTorch's synchronize) runs after every call, so
    work a device queued counts towards the call that queued it. With
    ``budget_s``, timing stops once that many seconds are spent (after at least
    3 calls)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    return 1e3 * statistics.median(times), len(times)


SGEMM_N = 2048


def sgemm_ceiling(n=SGEMM_N, repeats=5):
    """This machine's float32 matrix-product speed: ``np.dot`` of two n x n float32 matrices
    (NumPy's BLAS on all the threads it uses), 2 n**3 FLOPs, median of ``repeats`` after one
    warm-up. Returns dict n, ms, gflops.

    The convolutions are matrix products, so this is the practical ceiling their GFLOP/s are
    measured against (``add_sgemm_share``): a share near 100% leaves little to gain on this
    machine, whatever its absolute speed."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    ms, _ = median_ms(lambda: np.dot(a, b, out=out), repeats=repeats)
    return dict(n=n, ms=ms, gflops=2 * n**3 / ms / 1e6)


def add_sgemm_share(row, ceiling_gflops):
    """Beside every ``<x>gflops`` entry of ``row``, add ``<x>pct_sgemm``: its percentage of
    ``ceiling_gflops`` (None where the rate or the ceiling is None). Returns row."""
    for key in [k for k in row if k.endswith("gflops")]:
        rate = row[key]
        row[key[: -len("gflops")] + "pct_sgemm"] = (100 * rate / ceiling_gflops
                                                    if rate is not None and ceiling_gflops else None)
    return row


def blas_setting():
    """Which OpenBLAS kernels this process runs: ``OPENBLAS_CORETYPE`` as set in the environment
    ("unset" when it is not: OpenBLAS then picks by the CPU) and the kernel family NumPy's
    bundled OpenBLAS reports (``openblas_get_corename``; None for a NumPy built on another BLAS).
    The same CPU can run its 'Haswell' (AVX2) or 'SkylakeX' (AVX-512) kernels, at different speeds."""
    return dict(OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE") or "unset",
                openblas_corename=openblas_corename())


def unet_ops(base=16, depth=4, batch=8, size=256, in_channels=1):
    """The distinct ops of one U-Net training step: a list of (case, dims, count).

    ``count`` is how often the op runs in the step. Adam is one case over all
    parameters as one flat tensor (the trainer runs it tensor by tensor)."""
    widths = [base * 2**i for i in range(depth + 1)]
    ops = {}
    n_params = 0

    def add(case, **dims):
        key = (case, tuple(dims.items()))
        ops[key] = ops.get(key, 0) + 1

    def conv(cin, cout, h, k=3, relu=True, need_dx=True):
        nonlocal n_params
        n_params += cout * cin * k * k + cout
        add(conv2d(k, relu, need_dx), n=batch, cin=cin, cout=cout, h=h, w=h)

    cin, h = in_channels, size
    for i in range(depth):
        conv(cin, widths[i], h, need_dx=i > 0)  # the first conv needs no gradient for the image
        conv(widths[i], widths[i], h)
        add(MAXPOOL, n=batch, c=widths[i], h=h, w=h)
        cin, h = widths[i], h // 2
    conv(widths[depth - 1], widths[depth], h)
    conv(widths[depth], widths[depth], h)
    for i in reversed(range(depth)):
        add(UPCONV, n=batch, cin=widths[i + 1], cout=widths[i], cs=widths[i], h=h, w=h)
        n_params += widths[i + 1] * widths[i] * 4 + widths[i]
        h *= 2
        conv(2 * widths[i], widths[i], h)
        conv(widths[i], widths[i], h)
    conv(base, 1, size, k=1, relu=False)
    add(SIGMOID_BCE, n=batch, h=size, w=size)
    add(ADAM, size=n_params)
    return [(case, dict(dims), count) for (case, dims), count in ops.items()]


def forward_flops(base=16, depth=4, batch=8, size=256, in_channels=1):
    """FLOPs of one forward pass of the U-Net on a batch: its convolutions (3x3 and the 1x1 head)
    and 2x2 up-convolutions, a multiply-add counted as 2 (FLOPs = 2 x MACs): a k x k conv
    2 N H W Cin Cout k**2, an up-conv 2 N (2H)(2W) Cin Cout. Pooling, ReLU, the skip's copy and
    the loss are left out (a few operations per value, against hundreds per conv output)."""
    return sum(count * case.flops(**dims)[0] for case, dims, count in unet_ops(base, depth, batch, size, in_channels)
               if case.flops)


def step_flops(base=16, depth=4, batch=8, size=256, in_channels=1):
    """FLOPs of one training step, by the usual convention 3x the forward's (``forward_flops``):
    the backward of a conv computes dW and dX, each a product the size of the forward's. (The
    first conv needs no dX, so the step really does a little less; the convention keeps the
    figure comparable with other benchmarks.)"""
    return 3 * forward_flops(base, depth, batch, size, in_channels)


def _label(case, d):
    """conv2d 3x3 +relu 16->32 @128, upconv2x2 +skip 32->16 @64->128, adam 1,940,817 params, ..."""
    if "size" in d:
        return f"{case.name} {d['size']:,} params"
    chans = f" {d['cin']}->{d['cout']}" if "cin" in d else f" {d['c']}" if "c" in d else ""
    return f"{case.name}{chans} @{d['h']}" + (f"->{2 * d['h']}" if case is UPCONV else "")


def _validate(be, ref, case, dims, rng):
    """Max relative error of every output and gradient of be vs ref, on ``dims`` cropped to CROP."""
    small = {k: min(v, CROP.get(k, v)) for k, v in dims.items()}
    inputs, upstream = case.make(rng, np.float32, **small)
    upstream = case.comparable(inputs, upstream)
    got, want = case.run(be, inputs, upstream), case.run(ref, inputs, upstream)
    errs = [rel_err(g[k], w[k]) for g, w in zip(got, want, strict=True) for k in w if w[k] is not None]
    return dict(max_rel_err=max(errs), validated_on=small)


def _time(be, case, dims, rng, repeats, budget_s):
    """Forward and backward ms of case at its full shape (the inputs reach be before the clock starts)."""
    inputs, upstream = (case.to_backend(be, a) for a in case.make(rng, np.float32, **dims))
    _, c = case.forward(be, inputs)
    sync = be.synchronize  # nothing on a CPU backend
    out = dict(fwd_ms=median_ms(lambda: case.forward(be, inputs), sync, repeats, budget_s=budget_s)[0], bwd_ms=None)
    if case.backward:
        out["bwd_ms"] = median_ms(lambda: case.backward(be, c, upstream), sync, repeats, budget_s=budget_s)[0]
    ff, fb = case.flops(**dims) if case.flops else (None, None)
    out["fwd_gflops"] = ff / out["fwd_ms"] / 1e6 if ff else None
    out["bwd_gflops"] = fb / out["bwd_ms"] / 1e6 if fb else None
    return out


def op_table(backend="numba", base=16, depth=4, batch=8, size=256, repeats=5, progress=None, seed=0,
             budget_s=None):
    """Validate then time every distinct op of the U-Net step (float32). Returns a list of row dicts:
    op, count, max_rel_err, ok, validated_on, fwd_ms, bwd_ms, fwd_gflops, bwd_gflops (and error)."""
    be = get_backend(backend, "float32") if isinstance(backend, str) else backend
    ref = NumpyBackend("float32")
    rng = np.random.default_rng(seed)
    # Every op is validated first and timed afterwards: the validation's reference runs NumPy's
    # multi-threaded OpenBLAS, whose worker threads spin for a while after each product and took a
    # core from the op timed right after it (the forwards measured up to 2x slow that way).
    rows, ops = [], list(unet_ops(base, depth, batch, size))
    for case, dims, count in ops:
        row = dict(op=_label(case, dims), count=count)
        if progress:
            progress(f"validate {row['op']}")
        try:
            row.update(_validate(be, ref, case, dims, rng))
            row["ok"] = row["max_rel_err"] <= FLOAT32_RTOL
        except Exception as exc:  # report and go on: one broken op must not hide the rest
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    time.sleep(0.5)  # past the spin of OpenBLAS's threads after the last validation
    for (case, dims, _), row in zip(ops, rows, strict=True):
        if "error" in row:
            continue
        if progress:
            progress(f"time {row['op']}")
        try:
            row.update(_time(be, case, dims, rng, repeats, budget_s))
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    return rows


def or_dash(v, spec):
    """format(v, spec), or '-' for a missing value (None)."""
    return format(v, spec) if v is not None else "-"


def format_op_table(rows):
    """The op table as text: op | count | fwd ms | GF/s | bwd ms | GF/s | rel err | ok, and the step's sum.
    Rows that carry the sgemm share (``add_sgemm_share``) get a '%sg' column after each GF/s."""
    share = any("fwd_pct_sgemm" in r for r in rows)

    def pct(r, key):
        return f" {or_dash(r.get(key), '4.0f'):>4}" if share else ""

    sg = f" {'%sg':>4}" if share else ""
    lines = [f"{'op':<36} {'x':>2} {'fwd ms':>8} {'GF/s':>6}{sg} {'bwd ms':>8} {'GF/s':>6}{sg} {'rel err':>8}  ok"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<36} {r['count']:>2} NOT OK  {r['error']}")
            continue
        lines.append(f"{r['op']:<36} {r['count']:>2} {r['fwd_ms']:>8.2f} {or_dash(r['fwd_gflops'], '6.1f'):>6}"
                     f"{pct(r, 'fwd_pct_sgemm')} {or_dash(r['bwd_ms'], '8.2f'):>8} "
                     f"{or_dash(r['bwd_gflops'], '6.1f'):>6}{pct(r, 'bwd_pct_sgemm')} {r['max_rel_err']:>8.1e}  "
                     f"{'OK' if r['ok'] else 'NOT OK'}")
    lines.append(f"{'sum over the step (count x (fwd + bwd))':<47} {step_sum_ms(rows):>10.1f} ms")
    return "\n".join(lines)


def step_sum_ms(rows):
    """The op table's time for one step: each op's forward + backward times how often it runs."""
    return sum(r["count"] * (r["fwd_ms"] + (r["bwd_ms"] or 0)) for r in rows if "error" not in r)


def random_batch(batch, size, seed=0):
    """A float32 batch of images (N,1,size,size) in [0, 1) and binary masks."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 1, size, size)).astype(np.float32)
    return x, (rng.random(x.shape) > 0.5).astype(np.float32)


def minunet_stepper(model, x, y, lr=1e-3):
    """step() -> loss: one training step of ``model`` on the batch (x, y): zero_grad,
    forward, fused sigmoid+BCE, backward, Adam. The loss stays on the device
    (``sigmoid_bce_device``), so on a GPU the step never waits for it."""
    be = model.backend
    opt = Adam(model.params, model.grads, lr=lr, backend=be)
    x, y = be.asarray(x), be.asarray(y)
    loss_fn = be.sigmoid_bce_device

    def step():
        model.zero_grad()
        loss, dz = loss_fn(model.forward(x), y)
        model.backward(dz)
        opt.step()
        return loss

    return step


def minunet_forward(model, x):
    """forward() -> logits: the inference forward of ``model`` on x (moved to the backend once),
    ``train=False``: no layer keeps a cache for a backward pass."""
    xb = model.backend.asarray(x)
    return lambda: model.forward(xb, train=False)


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if os.uname().sysname == "Linux" else rss / 2**20


def cpu_threads():
    """The thread count both sides get: ``NUMBA_NUM_THREADS`` when set, else one per core."""
    return int(os.environ.get("NUMBA_NUM_THREADS", 0)) or os.cpu_count() or 1


def _torch_cpu_stepper(base, depth, x, y, threads):
    """The same U-Net and step in PyTorch on the CPU (channels_last, its fastest CPU layout),
    as (step, version), or None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    from minunet.torch_twin import torch_stepper, torch_twin

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch_stepper(torch_twin(1, base, depth), x, y, channels_last=True), torch.__version__


def train_step(backend="numba", base=16, depth=4, batch=8, size=256, repeats=5, torch_compare=True, progress=None):
    """Time the full training step (forward, sigmoid+BCE, backward, Adam), float32.

    Returns a dict: step_ms (median), images_per_s, step_gflop (``step_flops``) and
    gflops (its rate), peak_rss_mb (ru_maxrss of
    this process after the minunet steps, before any PyTorch work: an upper
    bound on the step's memory, counting Python, Numba and the libraries too),
    and with PyTorch importable torch_step_ms, torch_version, ratio
    (minunet / PyTorch time). The two are interleaved step by step so a
    change in machine load hits both alike."""
    be = get_backend(backend, "float32") if isinstance(backend, str) else backend
    sync = be.synchronize  # nothing on a CPU backend
    rss0 = peak_rss_mb()
    t_start = time.perf_counter()
    x, y = random_batch(batch, size)
    step = minunet_stepper(UNet(1, base, depth, backend=be, dtype="float32", seed=0), x, y)
    if progress:
        progress("minunet step: warm-up")
    step()
    if sync:
        sync()
    first_step_s = time.perf_counter() - t_start
    step_ms, _ = median_ms(step, sync, repeats, warmup=0)  # the first step above was the warm-up
    flops = step_flops(base, depth, batch, size)
    out = dict(backend=be.name, batch=batch, size=size, base=base, depth=depth, repeats=repeats,
               step_ms=step_ms, images_per_s=batch / (step_ms / 1e3), step_gflop=flops / 1e9,
               gflops=flops / step_ms / 1e6, peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0,
               first_step_s=first_step_s)
    threads = cpu_threads()
    made = _torch_cpu_stepper(base, depth, x, y, threads) if torch_compare else None
    if made is not None:
        tstep, version = made
        if progress:
            progress(f"PyTorch {version} step: warm-up, then interleaved with minunet")
        tstep()
        theirs, ours = [], []
        for _ in range(repeats):
            theirs.append(median_ms(tstep, repeats=1, warmup=0)[0])
            ours.append(median_ms(step, sync, repeats=1, warmup=0)[0])
        out.update(torch_version=version, torch_threads=threads, torch_step_ms=statistics.median(theirs),
                   interleaved_step_ms=statistics.median(ours))
        out["ratio"] = out["interleaved_step_ms"] / out["torch_step_ms"]
    return out
