"""Benchmarks, in the style of llm.c's ``dev/cuda``: validate each kernel against the reference, then time it.

``op_table`` takes every distinct op of the U-Net at its real shapes (default:
base 16, depth 4, batch 8, 1x256x256), checks the backend's forward and
backward against the NumPy reference (float32, on a cropped copy of the
shape: batch <= 2, H and W <= 64, so the reference stays quick), then times
forward and backward (warm-up, median of repeats) and reports ms and GFLOP/s.
``train_step`` times the whole training step (forward, fused sigmoid+BCE,
backward, Adam) in images/s and reports the process's peak memory; when
PyTorch is importable, ``torch_step`` times the same network and step in
PyTorch (channels_last, same thread count) and the steps are interleaved so
both see the same machine load. PyTorch is never a dependency.

Nothing here prints: results are dicts; ``progress(message)`` is called
between measurements when given (the CLI passes one).
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np

from minunet.kernels import get_backend
from minunet.kernels.numpy_ref import NumpyBackend
from minunet.model import UNet

FLOAT32_RTOL = 1e-4


def _sync(be):
    """Wait for queued device work (cupy); nothing on the CPU."""
    xp = be.xp
    if xp is not np and hasattr(xp, "cuda"):
        xp.cuda.Stream.null.synchronize()


def _median_ms(fn, be, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(be)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(be)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _rel_err(actual, expected):
    """max |a - e| / max(max |e|, 1e-30): the error relative to the tensor's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def unet_ops(base=16, depth=4, batch=8, size=256, in_channels=1):
    """The distinct ops of one U-Net training step, with how often each occurs.

    Returns a list of dicts: kind (conv, pool, upconv, concat, loss), the
    logical NCHW shape parameters, and ``count``."""
    widths = [base * 2**i for i in range(depth + 1)]
    ops = {}

    def add(key, **spec):
        if key in ops:
            ops[key]["count"] += 1
        else:
            ops[key] = dict(spec, count=1)

    def conv(cin, cout, h, k=3, relu=True, need_dx=True):
        key = ("conv", cin, cout, h, k, relu, need_dx)
        add(key, kind="conv", cin=cin, cout=cout, h=h, k=k, relu=relu, need_dx=need_dx)

    cin, h = in_channels, size
    for i in range(depth):
        conv(cin, widths[i], h, need_dx=i > 0)
        conv(widths[i], widths[i], h)
        add(("pool", widths[i], h), kind="pool", c=widths[i], h=h)
        cin, h = widths[i], h // 2
    conv(widths[depth - 1], widths[depth], h)
    conv(widths[depth], widths[depth], h)
    for i in reversed(range(depth)):
        h *= 2
        add(("upconv", widths[i + 1], widths[i], h // 2), kind="upconv", cin=widths[i + 1], cout=widths[i], h=h // 2)
        add(("concat", widths[i], h), kind="concat", c=widths[i], h=h)
        conv(2 * widths[i], widths[i], h)
        conv(widths[i], widths[i], h)
    conv(base, 1, size, k=1, relu=False)
    add(("loss", size), kind="loss", h=size)
    out = list(ops.values())
    for op in out:
        op["n"] = batch
    return out


def _label(op):
    k = op["kind"]
    if k == "conv":
        name = f"conv{op['k']}x{op['k']} {op['cin']}->{op['cout']} @{op['h']}"
        return name + (" +relu" if op["relu"] else "") + ("" if op["need_dx"] else " (no dx)")
    if k == "pool":
        return f"maxpool2x2 {op['c']} @{op['h']}"
    if k == "upconv":
        return f"upconv2x2 {op['cin']}->{op['cout']} @{op['h']}->{2 * op['h']}"
    if k == "concat":
        return f"concat/split {op['c']}+{op['c']} @{op['h']}"
    return f"sigmoid+BCE 1 @{op['h']}"


def _flops(op):
    """(forward, backward) floating-point operations (multiply-add = 2), or (None, None)."""
    n, h = op["n"], op["h"]
    if op["kind"] == "conv":
        f = 2 * n * h * h * op["cin"] * op["cout"] * op["k"] ** 2
        return f, f * (2 if op["need_dx"] else 1)
    if op["kind"] == "upconv":
        f = 2 * n * h * h * op["cin"] * op["cout"] * 4
        return f, 2 * f
    return None, None


def _make_inputs(op, n, h, rng, dtype):
    """Random NCHW inputs and parameters for one op at batch n and size h x h."""
    k = op["kind"]
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    if k == "conv":
        return dict(x=r(n, op["cin"], h, h), w=r(op["cout"], op["cin"], op["k"], op["k"]) * 0.1, b=r(op["cout"]),
                    dy=r(n, op["cout"], h, h))
    if k == "pool":
        return dict(x=r(n, op["c"], h, h), dy=r(n, op["c"], h // 2, h // 2))
    if k == "upconv":
        return dict(x=r(n, op["cin"], h, h), w=r(op["cin"], op["cout"], 2, 2) * 0.1, b=r(op["cout"]),
                    dy=r(n, op["cout"], 2 * h, 2 * h))
    if k == "concat":
        return dict(a=r(n, op["c"], h, h), b=r(n, op["c"], h, h), d=r(n, 2 * op["c"], h, h))
    return dict(z=r(n, 1, h, h) * 3, y=(rng.random((n, 1, h, h)) > 0.5).astype(dtype))


def _op_fns(be, op, inp):
    """(forward(), backward(), outputs()) closures for one op on backend be, inputs already in be's layout.

    outputs() runs forward then backward once and returns NCHW host arrays, for validation."""
    k = op["kind"]
    host = lambda a: np.asarray(be.to_host(be.to_nchw(a)))  # noqa: E731
    param = lambda a: np.asarray(be.to_host(a))  # noqa: E731
    state = {}
    if k == "conv":
        def fwd():
            state["y"], state["c"] = be.conv2d_forward(inp["x"], inp["w"], inp["b"], relu=op["relu"])

        def bwd():
            return be.conv2d_backward(inp["dy"], state["c"], need_dx=op["need_dx"])

        def outs():
            fwd()
            dx, dw, db = bwd()
            return [host(state["y"])] + ([host(dx)] if dx is not None else []) + [param(dw), param(db)]
    elif k == "pool":
        def fwd():
            state["y"], state["c"] = be.maxpool2x2_forward(inp["x"])

        def bwd():
            return be.maxpool2x2_backward(inp["dy"], state["c"])

        def outs():
            fwd()
            return [host(state["y"]), host(bwd())]
    elif k == "upconv":
        def fwd():
            state["y"], state["c"] = be.upconv2x2_forward(inp["x"], inp["w"], inp["b"])

        def bwd():
            return be.upconv2x2_backward(inp["dy"], state["c"])

        def outs():
            fwd()
            dx, dw, db = bwd()
            return [host(state["y"]), host(dx), param(dw), param(db)]
    elif k == "concat":
        c = op["c"]

        def fwd():
            state["y"] = be.concat_channels(inp["a"], inp["b"])

        def bwd():
            return be.split_channels(inp["d"], c)

        def outs():
            fwd()
            da, db = bwd()
            return [host(state["y"]), host(da), host(db)]
    else:
        def fwd():
            state["s"] = be.sigmoid(inp["z"])

        def bwd():
            return be.sigmoid_bce(inp["z"], inp["y"])

        def outs():
            fwd()
            loss, dz = bwd()
            return [param(state["s"]), np.array([loss]), param(dz)]
    return fwd, bwd, outs


def _to_backend(be, op, inp):
    """Move NCHW host inputs into be: activations through from_nchw, the rest through asarray."""
    acts = {"x", "dy", "a", "b", "d"} if op["kind"] != "loss" else set()
    if op["kind"] in ("conv", "upconv"):
        acts = {"x", "dy"}
    return {key: (be.from_nchw(be.asarray(v)) if key in acts else be.asarray(v)) for key, v in inp.items()}


def op_table(backend="numba", base=16, depth=4, batch=8, size=256, repeats=5, progress=None, seed=0):
    """Validate then time every distinct op of the U-Net step (float32). Returns a list of row dicts."""
    be = get_backend(backend, "float32") if isinstance(backend, str) else backend
    ref = NumpyBackend("float32")
    rng = np.random.default_rng(seed)
    rows = []
    for op in unet_ops(base, depth, batch, size):
        label = _label(op)
        if progress:
            progress(f"op {label}")
        # 1. validate on a cropped shape against the reference
        n_val = min(batch, 2)
        h_val = min(op["h"], 64)
        small = _make_inputs(op, n_val, h_val, rng, np.float32)
        got = _op_fns(be, op, _to_backend(be, op, small))[2]()
        want = _op_fns(ref, op, small)[2]()
        err = max(_rel_err(a, b) for a, b in zip(got, want, strict=True))
        # 2. time at the real shape
        inp = _to_backend(be, op, _make_inputs(op, op["n"], op["h"], rng, np.float32))
        fwd, bwd, _ = _op_fns(be, op, inp)
        fwd_ms = _median_ms(fwd, be, repeats)
        bwd_ms = _median_ms(bwd, be, repeats)
        ff, fb = _flops(op)
        rows.append(dict(
            op=label, count=op["count"], fwd_ms=fwd_ms, bwd_ms=bwd_ms,
            fwd_gflops=ff / fwd_ms / 1e6 if ff else None, bwd_gflops=fb / bwd_ms / 1e6 if fb else None,
            max_rel_err=err, ok=err <= FLOAT32_RTOL, validated_on=f"{n_val}x{h_val}x{h_val}",
        ))
    return rows


def _peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if os.uname().sysname == "Linux" else rss / 2**20


def _minunet_stepper(be, base, depth, batch, size, seed=0):
    from minunet.optim import Adam

    rng = np.random.default_rng(seed)
    model = UNet(1, base, depth, backend=be, dtype="float32", seed=seed)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    x = be.asarray(rng.random((batch, 1, size, size)).astype(np.float32))
    y = be.asarray((rng.random((batch, 1, size, size)) > 0.5).astype(np.float32))

    def step():
        model.zero_grad()
        loss, dz = be.sigmoid_bce(model.forward(x), y)
        model.backward(dz)
        opt.step()
        return loss

    return step


def _torch_stepper(base, depth, batch, size, threads, seed=0):
    """The same U-Net and step in PyTorch (channels_last), or None when torch is not importable."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    from minunet.torch_twin import torch_twin

    model = torch_twin(1, base, depth).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    x = torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, torch.__version__


def train_step(backend="numba", base=16, depth=4, batch=8, size=256, repeats=5, torch_compare=True, progress=None):
    """Time the full training step (forward, sigmoid+BCE, backward, Adam), float32.

    Returns a dict: step_ms (median), images_per_s, peak_rss_mb (ru_maxrss of
    this process after the minunet steps, before any PyTorch work: an upper
    bound on the step's memory, counting Python, Numba and the libraries too),
    and with PyTorch importable torch_step_ms, torch_version, ratio
    (minunet / PyTorch time). The two are interleaved step by step so a
    change in machine load hits both alike."""
    be = get_backend(backend, "float32") if isinstance(backend, str) else backend
    rss0 = _peak_rss_mb()
    t_start = time.perf_counter()
    step = _minunet_stepper(be, base, depth, batch, size)
    if progress:
        progress("minunet step: warm-up")
    step()
    _sync(be)
    first_step_s = time.perf_counter() - t_start
    step_ms = _median_ms(step, be, repeats, warmup=0)  # the first step above was the warm-up
    peak = _peak_rss_mb()
    out = dict(backend=be.name, batch=batch, size=size, base=base, depth=depth, repeats=repeats,
               step_ms=step_ms, peak_rss_mb=peak, rss_before_mb=rss0,
               first_step_s=first_step_s)
    out["images_per_s"] = batch / (out["step_ms"] / 1e3)
    if torch_compare:
        threads = int(os.environ.get("NUMBA_NUM_THREADS", 0)) or os.cpu_count() or 1
        made = _torch_stepper(base, depth, batch, size, threads)
        if made is not None:
            tstep, version = made
            if progress:
                progress(f"PyTorch {version} step: warm-up, then interleaved with minunet")
            tstep()
            theirs, ours2 = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                tstep()
                theirs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                step()
                _sync(be)
                ours2.append(time.perf_counter() - t0)
            out.update(torch_version=version, torch_threads=threads,
                       torch_step_ms=1e3 * statistics.median(theirs),
                       interleaved_step_ms=1e3 * statistics.median(ours2))
            out["ratio"] = out["interleaved_step_ms"] / out["torch_step_ms"]
    return out
