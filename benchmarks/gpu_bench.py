"""GPU benchmark of the cupy backend: per-op (validated, then timed) and the full training step vs PyTorch.

Run by ``benchmarks/gpu_check.sh`` on a CUDA machine (``PYTHONPATH=.``):

    python3 benchmarks/gpu_bench.py ops    [--json F]   # per-op, U-Net base 16, depth 4, batch 8, 256x256
    python3 benchmarks/gpu_bench.py step   [--json F]   # training step, base 32 and 64, depth 4, batch 16
    python3 benchmarks/gpu_bench.py summary --json-dir D --tests-line "..."   # the short table, last

Every op is first checked against the numpy reference on a smaller crop (same
channels), then timed at full size with CUDA events: warm-up, then the median
of the repetitions. The training step (zero_grad, forward, fused BCE, backward,
Adam) is timed the same way for minunet on cupy and for a PyTorch twin of the
same U-Net (conv3x3-ReLU x2 per level, max-pool, ConvTranspose2d 2x2/2,
concat(skip, up), 1x1 head, BCEWithLogits, Adam), float32 with TF32 off and
on, cudnn.benchmark on (PyTorch at its best). The twin first proves it is the
same network: loaded with minunet's weights it must give the same loss,
logits and gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from minunet.torch_twin import copy_weights, torch_name, torch_twin

EPOCH_IMAGES = 21715  # COVID-QU-Ex lung segmentation training split


def _now():
    return time.perf_counter()


def gpu_time_ms(fn, warmup=2, reps=10, budget_s=20.0):
    """Median GPU time of fn() in ms, timed with CUDA events around each call."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    t0 = _now()
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
        if _now() - t0 > budget_s and len(times) >= 3:
            break
    return float(np.median(times)), len(times)


def max_rel_err(actual, expected):
    """max |a - e| / max(max |e|, 1e-12): the error relative to the largest reference value."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return float("inf")
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-12)) if e.size else 0.0


# ---------------------------------------------------------------------------------------------
# per-op benchmark
# ---------------------------------------------------------------------------------------------
def bench_ops(base=16, depth=4, batch=8, size=256, crop=32, crop_batch=2, tol=2e-4):
    import cupy

    from minunet.kernels.cupy import CupyBackend
    from minunet.kernels.numpy_ref import NumpyBackend
    from minunet.model import UNet

    be, ref = CupyBackend("float32"), NumpyBackend("float32")
    rng = np.random.default_rng(0)
    rows = []

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def record(op, shape, flops, check, timed):
        """check() -> max rel err on the crop; timed: a closure at full size."""
        try:
            err = check()
            ms, reps = gpu_time_ms(timed)
            ok = err <= tol
            row = dict(op=op, shape=shape, ok=bool(ok), err=err, ms=ms, reps=reps,
                       gflops=(flops / ms / 1e6) if flops else None)
        except Exception as exc:  # report and go on: one broken op must not hide the rest
            row = dict(op=op, shape=shape, ok=False, err=None, ms=None, reps=0, gflops=None,
                       error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        g = f"{row['gflops']:8.0f}" if row.get("gflops") else "       -"
        e = f"{row['err']:.1e}" if row.get("err") is not None else "   -   "
        t = f"{row['ms']:9.3f}" if row.get("ms") is not None else "        -"
        print(f"  {op:<22} {shape:<26} {'OK' if row['ok'] else 'NOT OK':<6} {e:>8} {t} ms {g} GFLOP/s"
              + (f"  {row['error']}" if "error" in row else ""), flush=True)

    print(f"per-op: cupy backend, U-Net base {base}, depth {depth}, batch {batch}, {size}x{size}, float32")
    print(f"  {'op':<22} {'shape (N,C,H,W)':<26} {'check':<6} {'max rel':>8} {'median':>9}    {'rate':>8}")

    def conv_case(label, cin, cout, h, k=3, relu=True):
        n, hc = batch, min(h, crop)
        x_s, w, b, dy_s = rand(crop_batch, cin, hc, hc), rand(cout, cin, k, k) * 0.1, rand(cout), rand(
            crop_batch, cout, hc, hc)
        wd, bd = be.asarray(w), be.asarray(b)

        def check_fwd():
            y, _ = be.conv2d_forward(be.from_nchw(x_s), wd, bd, relu=relu)
            return max_rel_err(be.to_host(be.to_nchw(y)), ref.conv2d_forward(x_s, w, b, relu=relu)[0])

        def check_bwd():
            y, c = be.conv2d_forward(be.from_nchw(x_s), wd, bd, relu=relu)
            dx, dw, db = be.conv2d_backward(be.from_nchw(dy_s), c)
            _, cr = ref.conv2d_forward(x_s, w, b, relu=relu)
            dxr, dwr, dbr = ref.conv2d_backward(dy_s, cr)
            return max(max_rel_err(be.to_host(be.to_nchw(dx)), dxr), max_rel_err(be.to_host(dw), dwr),
                       max_rel_err(be.to_host(db), dbr))

        xf = be.from_nchw(cupy.asarray(rng.standard_normal((n, cin, h, h), dtype=np.float32)))
        dyf = be.from_nchw(cupy.asarray(rng.standard_normal((n, cout, h, h), dtype=np.float32)))
        _, cf = be.conv2d_forward(xf, wd, bd, relu=relu)
        flops = 2.0 * n * h * h * cout * cin * k * k
        shape = f"{n},{cin}->{cout},{h},{h} k{k}"
        record(f"{label} fwd", shape, flops, check_fwd, lambda: be.conv2d_forward(xf, wd, bd, relu=relu))
        record(f"{label} bwd", shape, 2 * flops, check_bwd, lambda: be.conv2d_backward(dyf, cf))

    widths = [base * 2**i for i in range(depth + 1)]
    for i in range(depth + 1):
        h = size >> i
        if i == 0:
            conv_case("conv L0 1->C", 1, widths[0], h)
        else:
            conv_case(f"conv L{i} enc1", widths[i - 1], widths[i], h)
        conv_case(f"conv L{i} enc2", widths[i], widths[i], h)
        if i < depth:
            conv_case(f"conv L{i} dec1", 2 * widths[i], widths[i], h)

    for i in range(depth):
        h, c, n = size >> i, widths[i], batch
        hc = min(h, crop)
        x_s, dy_s = rand(crop_batch, c, hc, hc), rand(crop_batch, c, hc // 2, hc // 2)

        def check_pool(x_s=x_s, dy_s=dy_s):
            y, cc = be.maxpool2x2_forward(be.from_nchw(x_s))
            dx = be.maxpool2x2_backward(be.from_nchw(dy_s), cc)
            yr, cr = ref.maxpool2x2_forward(x_s)
            return max(max_rel_err(be.to_host(be.to_nchw(y)), yr),
                       max_rel_err(be.to_host(be.to_nchw(dx)), ref.maxpool2x2_backward(dy_s, cr)))

        xf = be.from_nchw(cupy.asarray(rng.standard_normal((n, c, h, h), dtype=np.float32)))
        dyf = be.from_nchw(cupy.asarray(rng.standard_normal((n, c, h // 2, h // 2), dtype=np.float32)))
        _, cf = be.maxpool2x2_forward(xf)
        shape = f"{n},{c},{h},{h}"
        record(f"maxpool L{i} fwd", shape, 0, check_pool, lambda xf=xf: be.maxpool2x2_forward(xf))
        record(f"maxpool L{i} bwd", shape, 0, check_pool, lambda dyf=dyf, cf=cf: be.maxpool2x2_backward(dyf, cf))

        # up-conv from level i+1 to level i
        cin, cout, hi = widths[i + 1], widths[i], h // 2
        hic = min(hi, crop)
        w, b = rand(cin, cout, 2, 2) * 0.1, rand(cout)
        wd, bd = be.asarray(w), be.asarray(b)
        xu_s, dyu_s = rand(crop_batch, cin, hic, hic), rand(crop_batch, cout, 2 * hic, 2 * hic)

        def check_up(xu_s=xu_s, dyu_s=dyu_s, w=w, b=b, wd=wd, bd=bd):
            y, cc = be.upconv2x2_forward(be.from_nchw(xu_s), wd, bd)
            dx, dw, db = be.upconv2x2_backward(be.from_nchw(dyu_s), cc)
            yr, cr = ref.upconv2x2_forward(xu_s, w, b)
            dxr, dwr, dbr = ref.upconv2x2_backward(dyu_s, cr)
            return max(max_rel_err(be.to_host(be.to_nchw(y)), yr), max_rel_err(be.to_host(be.to_nchw(dx)), dxr),
                       max_rel_err(be.to_host(dw), dwr), max_rel_err(be.to_host(db), dbr))

        xuf = be.from_nchw(cupy.asarray(rng.standard_normal((n, cin, hi, hi), dtype=np.float32)))
        dyuf = be.from_nchw(cupy.asarray(rng.standard_normal((n, cout, h, h), dtype=np.float32)))
        _, cuf = be.upconv2x2_forward(xuf, wd, bd)
        flops = 2.0 * n * hi * hi * cin * cout * 4
        shape = f"{n},{cin}->{cout},{hi}->{h}"
        record(f"upconv L{i} fwd", shape, flops, check_up,
               lambda xuf=xuf, wd=wd, bd=bd: be.upconv2x2_forward(xuf, wd, bd))
        record(f"upconv L{i} bwd", shape, 2 * flops, check_up,
               lambda dyuf=dyuf, cuf=cuf: be.upconv2x2_backward(dyuf, cuf))

    # skip connection at level 0
    c, h, n = widths[0], size, batch
    a_s, b_s = rand(crop_batch, c, crop, crop), rand(crop_batch, c, crop, crop)

    def check_cat():
        cat = be.concat_channels(be.from_nchw(a_s), be.from_nchw(b_s))
        da, db = be.split_channels(cat, c)
        return max(max_rel_err(be.to_host(be.to_nchw(cat)), ref.concat_channels(a_s, b_s)),
                   max_rel_err(be.to_host(be.to_nchw(da)), a_s), max_rel_err(be.to_host(be.to_nchw(db)), b_s))

    af = be.from_nchw(cupy.asarray(rng.standard_normal((n, c, h, h), dtype=np.float32)))
    bf = be.from_nchw(cupy.asarray(rng.standard_normal((n, c, h, h), dtype=np.float32)))
    catf = be.concat_channels(af, bf)
    record("concat L0", f"{n},{c}+{c},{h},{h}", 0, check_cat, lambda: be.concat_channels(af, bf))
    record("split L0", f"{n},{2 * c},{h},{h}", 0, check_cat, lambda: be.split_channels(catf, c))

    conv_case("head 1x1", widths[0], 1, size, k=1, relu=False)

    z_s = rand(crop_batch, 1, crop, crop) * 5
    y_s = (rng.random(z_s.shape) > 0.5).astype(np.float32)

    def check_bce():
        loss, dz = be.sigmoid_bce(be.asarray(z_s), be.asarray(y_s))
        lr, dzr = ref.sigmoid_bce(z_s, y_s)
        return max(abs(loss - lr) / max(abs(lr), 1e-12), max_rel_err(be.to_host(dz), dzr))

    zf = cupy.asarray(rng.standard_normal((n, 1, h, h), dtype=np.float32) * 5)
    yf = cupy.asarray((rng.random((n, 1, h, h)) > 0.5).astype(np.float32))
    record("sigmoid_bce", f"{n},1,{h},{h}", 0, check_bce, lambda: be.sigmoid_bce_device(zf, yf))

    # Adam over every parameter of the U-Net, one fused kernel per tensor
    model = UNet(1, base, depth, backend=be, seed=0)
    ps = list(model.params.values())
    gs = [cupy.asarray(rng.standard_normal(p.shape, dtype=np.float32)) for p in ps]
    ms_, vs_ = [cupy.zeros_like(p) for p in ps], [cupy.zeros_like(p) for p in ps]
    p0 = [rand(8, 9)]

    def check_adam():
        p, g = p0[0].copy(), rand(8, 9)
        m, v = np.zeros_like(p), np.zeros_like(p)
        pd, gd, md, vd = (be.asarray(a) for a in (p, g, m, v))
        for t in (1, 2, 3):
            ref.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, t)
            be.adam_step(pd, gd, md, vd, 1e-3, 0.9, 0.999, 1e-8, t)
        return max(max_rel_err(be.to_host(pd), p), max_rel_err(be.to_host(md), m), max_rel_err(be.to_host(vd), v))

    def adam_all():
        for p, g, m, v in zip(ps, gs, ms_, vs_, strict=True):
            be.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 5)

    record("adam (all params)", f"{model.num_params():,} params", 0, check_adam, adam_all)
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


# ---------------------------------------------------------------------------------------------
# PyTorch twin and the training step
# ---------------------------------------------------------------------------------------------
def check_twin(base=8, depth=3, batch=2, size=64):
    """minunet (cupy) vs the PyTorch twin with the same weights, fp32, TF32 off: loss, logits, grads, Adam."""
    import torch
    from torch.nn import functional as F

    from minunet.kernels.cupy import CupyBackend
    from minunet.model import UNet
    from minunet.optim import Adam

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = np.random.default_rng(1)
    x = rng.random((batch, 1, size, size)).astype(np.float32)
    y = (rng.random(x.shape) > 0.6).astype(np.float32)
    be = CupyBackend("float32")
    model = UNet(1, base, depth, backend=be, seed=2)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    tm = torch_twin(1, base, depth).cuda()
    copy_weights(model, tm)
    topt = torch.optim.Adam(tm.parameters(), lr=1e-3)

    model.zero_grad()
    logits = model.forward(be.asarray(x))
    loss, dz = be.sigmoid_bce(logits, be.asarray(y))
    model.backward(dz)
    opt.step()
    xt, yt = torch.as_tensor(x, device="cuda"), torch.as_tensor(y, device="cuda")
    topt.zero_grad()
    tl = tm(xt)
    tloss = F.binary_cross_entropy_with_logits(tl, yt)
    tloss.backward()
    tgrads = {n: p.grad.detach().cpu().numpy() for n, p in tm.named_parameters()}
    topt.step()
    tp = {n: p.detach().cpu().numpy() for n, p in tm.named_parameters()}
    errs = {"loss": abs(loss - tloss.item()) / max(abs(tloss.item()), 1e-12),
            "logits": max_rel_err(be.to_host(logits), tl.detach().cpu().numpy())}
    errs["grads (worst)"] = max(max_rel_err(be.to_host(model.grads[n]), tgrads[torch_name(n)]) for n in model.params)
    errs["params after Adam (worst)"] = max(max_rel_err(be.to_host(model.params[n]), tp[torch_name(n)])
                                            for n in model.params)
    ok = errs["loss"] < 1e-5 and errs["logits"] < 1e-4 and errs["grads (worst)"] < 1e-3 and \
        errs["params after Adam (worst)"] < 1e-3
    return ok, errs


def time_minunet_step(base, depth, batch, size, steps=10):
    import cupy

    from minunet.kernels.cupy import CupyBackend
    from minunet.model import UNet
    from minunet.optim import Adam

    be = CupyBackend("float32")
    rng = np.random.default_rng(0)
    model = UNet(1, base, depth, backend=be, seed=0)
    opt = Adam(model.params, model.grads, lr=1e-3, backend=be)
    x = cupy.asarray(rng.random((batch, 1, size, size), dtype=np.float32))
    y = cupy.asarray((rng.random((batch, 1, size, size)) > 0.5).astype(np.float32))
    losses = []

    def step():
        model.zero_grad()
        logits = model.forward(x)
        loss, dz = be.sigmoid_bce_device(logits, y)  # no host sync inside the step
        model.backward(dz)
        opt.step()
        losses.append(loss)

    ms, reps = gpu_time_ms(step, warmup=2, reps=steps, budget_s=40.0)
    first, last = float(losses[0]), float(losses[-1])
    peak = cupy.get_default_memory_pool().total_bytes() / 2**30
    return dict(ms=ms, reps=reps, loss_first=first, loss_last=last, pool_gib=peak)


def time_torch_step(base, depth, batch, size, tf32, steps=10):
    import torch
    from torch.nn import functional as F

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    tm = torch_twin(1, base, depth).cuda()
    opt = torch.optim.Adam(tm.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size, device="cuda")
    y = (torch.rand(batch, 1, size, size, device="cuda") > 0.5).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(tm(x), y)
        loss.backward()
        opt.step()

    for _ in range(3):  # cudnn.benchmark autotunes on the first calls
        step()
    torch.cuda.synchronize()
    times = []
    t0 = _now()
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
        if _now() - t0 > 40 and len(times) >= 3:
            break
    return dict(ms=float(np.median(times)), reps=len(times))


def free_gpu_memory():
    import gc

    gc.collect()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    except Exception:  # no cupy: nothing to free
        pass
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # no torch: nothing to free
        pass


def bench_step(bases=(32, 64), depth=4, batch=16, size=256):
    rows = []
    print("twin check: minunet (cupy) vs PyTorch with the same weights, float32, TF32 off")
    try:
        ok, errs = check_twin()
        for k, v in errs.items():
            print(f"  {k:<28} max rel err {v:.2e}")
        print(f"  twin check: {'OK' if ok else 'NOT OK'}", flush=True)
    except Exception as exc:
        ok, errs = False, {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  twin check: NOT OK ({errs['error']})", flush=True)
    twin = dict(ok=ok, errs=errs)

    print(f"training step: depth {depth}, batch {batch}, 1x{size}x{size}, forward + BCE + backward + Adam")
    for base in bases:
        for impl, tf32 in (("minunet cupy", None), ("pytorch fp32", False), ("pytorch tf32", True)):
            try:
                if impl == "minunet cupy":
                    r = time_minunet_step(base, depth, batch, size)
                else:
                    r = time_torch_step(base, depth, batch, size, tf32)
            except Exception as exc:
                r = dict(ms=None, reps=0, error=f"{type(exc).__name__}: {exc}")
            free_gpu_memory()  # the step's buffers are gone with its frame: hand them back
            r.update(base=base, impl=impl, batch=batch)
            if r.get("ms"):
                r["img_s"] = batch * 1000.0 / r["ms"]
                r["epoch_s"] = EPOCH_IMAGES / r["img_s"]
            rows.append(r)
            extra = f"  loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, pool {r['pool_gib']:.1f} GiB" \
                if "loss_first" in r else ""
            if r.get("ms"):
                print(f"  base {base:<3} {impl:<13} {r['ms']:9.2f} ms/step {r['img_s']:8.1f} img/s "
                      f"epoch {r['epoch_s']:7.1f} s{extra}", flush=True)
            else:
                print(f"  base {base:<3} {impl:<13} FAILED: {r.get('error')}", flush=True)
    return dict(twin=twin, steps=rows)


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summary(json_dir, tests_line, device_line):
    def load(name):
        try:
            with open(os.path.join(json_dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    ops, step = load("gpu_ops.json"), load("gpu_step.json")
    lines = ["", "=" * 78, "SUMMARY  minunet cupy backend on " + (device_line or "?"), "=" * 78]
    lines.append(f"GPU tests      : {tests_line or 'not run'}")
    if ops:
        rows = ops["rows"]
        bad = [r["op"] for r in rows if not r["ok"]]
        total = sum(r["ms"] for r in rows if r.get("ms"))
        lines.append(f"per-op check   : {len(rows) - len(bad)}/{len(rows)} OK vs numpy reference"
                     + (f"  NOT OK: {', '.join(bad)}" if bad else ""))
        lines.append(f"per-op time    : sum of medians {total:.2f} ms (base 16, depth 4, batch 8, 256x256)")
    else:
        lines.append("per-op         : not run or failed (see above)")
    if step:
        t = step["twin"]
        lines.append(f"twin vs torch  : {'OK' if t['ok'] else 'NOT OK'} (same weights: loss, logits, grads, Adam)")
        lines.append("")
        lines.append(f"{'base':>4} {'implementation':<14} {'ms/step':>9} {'img/s':>8} {'epoch 21,715':>13} "
                     f"{'minunet/this':>13}")
        by = {(r["base"], r["impl"]): r for r in step["steps"]}
        for r in step["steps"]:
            mine = by.get((r["base"], "minunet cupy"), {}).get("ms")
            ratio = f"{mine / r['ms']:.2f}x" if mine and r.get("ms") else "-"
            if r.get("ms"):
                lines.append(f"{r['base']:>4} {r['impl']:<14} {r['ms']:9.2f} {r['img_s']:8.1f} "
                             f"{r['epoch_s']:11.1f} s {ratio:>13}")
            else:
                lines.append(f"{r['base']:>4} {r['impl']:<14} {'FAILED':>9}")
        mine, fp32 = by.get((64, "minunet cupy"), {}).get("ms"), by.get((64, "pytorch fp32"), {}).get("ms")
        if mine and fp32:
            verdict = "MET" if mine / fp32 <= 1.5 else "NOT MET"
            lines.append(f"target base 64 <= 1.5x PyTorch fp32 (TF32 off): {mine / fp32:.2f}x  {verdict}")
    else:
        lines.append("training step  : not run or failed (see above)")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(json_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")


def device_line():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return (f"{name}, cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
            f"driver {cupy.cuda.runtime.driverGetVersion()}, CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["device", "ops", "step", "summary"])
    ap.add_argument("--json-dir", default=os.environ.get("OUT") or ".")
    ap.add_argument("--tests-line", default="")
    ap.add_argument("--device-line", default="")
    ap.add_argument("--bases", default="32,64")
    a = ap.parse_args(argv)
    os.makedirs(a.json_dir, exist_ok=True)
    if a.what == "device":
        print(device_line())
        return 0
    if a.what == "summary":
        summary(a.json_dir, a.tests_line, a.device_line)
        return 0
    t0 = _now()
    if a.what == "ops":
        rows = bench_ops()
        result = dict(rows=rows, seconds=_now() - t0)
        name, ok = "gpu_ops.json", all(r["ok"] for r in rows)
    else:
        result = bench_step(bases=tuple(int(b) for b in a.bases.split(",")))
        result["seconds"] = _now() - t0
        name, ok = "gpu_step.json", result["twin"]["ok"] and all(r.get("ms") for r in result["steps"])
    with open(os.path.join(a.json_dir, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"({a.what}: {_now() - t0:.1f} s, wrote {os.path.join(a.json_dir, name)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
