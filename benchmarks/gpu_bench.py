"""GPU benchmark of the cupy backend: per-op (validated, then timed) and the full training step vs PyTorch.

Run by ``benchmarks/gpu_check.sh`` on a CUDA machine (``PYTHONPATH=.``):

    python3 benchmarks/gpu_bench.py ops    [--json-dir D]   # per-op, U-Net base 16, depth 4, batch 8, 256x256
    python3 benchmarks/gpu_bench.py step   [--json-dir D]   # training step, base 32 and 64, depth 4, batch 16
    python3 benchmarks/gpu_bench.py summary --json-dir D --tests-line "..."   # the short table, last

The per-op table is ``minunet bench``'s (``minunet.bench.op_table``): every op
is first checked against the numpy reference on a crop of its shape, then
timed at full size (warm-up, then the median of the repetitions, each followed
by a device synchronisation). The training step (zero_grad, forward, fused
BCE, backward, Adam) is timed the same way for minunet on cupy and for the
PyTorch twin of the same U-Net (``minunet.torch_twin``), float32 with TF32 off
and on, cudnn.benchmark on (PyTorch at its best). The twin first proves it is
the same network: loaded with minunet's weights it must give the same loss,
logits and gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from minunet.bench import format_op_table, median_ms, minunet_stepper, op_table, random_batch, step_sum_ms
from minunet.kernels import get_backend
from minunet.model import UNet
from minunet.opcases import rel_err
from minunet.torch_twin import copy_weights, torch_name, torch_stepper, torch_twin

EPOCH_IMAGES = 21715  # COVID-QU-Ex lung segmentation training split


def bench_ops(base=16, depth=4, batch=8, size=256):
    print(f"per-op: cupy backend, U-Net base {base}, depth {depth}, batch {batch}, {size}x{size}, float32")
    rows = op_table(get_backend("cupy", "float32"), base, depth, batch, size, repeats=10, budget_s=20.0,
                    progress=lambda msg: print(f"  ... {msg}", flush=True))
    print(format_op_table(rows))
    return rows


def _torch_flags(tf32):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def check_twin(base=8, depth=3, batch=2, size=64):
    """minunet (cupy) vs the PyTorch twin with the same weights, fp32, TF32 off: loss, logits, grads, Adam."""
    import torch

    _torch_flags(False)
    x, y = random_batch(batch, size, seed=1)
    be = get_backend("cupy", "float32")
    model = UNet(1, base, depth, backend=be, seed=2)
    tm = torch_twin(1, base, depth).cuda()
    copy_weights(model, tm)
    logits, tlogits = be.to_host(model.forward(be.asarray(x))), tm(torch.as_tensor(x, device="cuda"))
    loss, tloss = float(minunet_stepper(model, x, y)()), float(torch_stepper(tm, x, y)())
    tp = dict(tm.named_parameters())

    def worst(mine, theirs):  # the largest error over the parameter tensors
        return max(rel_err(be.to_host(mine[n]), theirs(tp[torch_name(n)]).cpu().numpy()) for n in model.params)

    errs = {"loss": rel_err(loss, tloss), "logits": rel_err(logits, tlogits.detach().cpu().numpy()),
            "grads (worst)": worst(model.grads, lambda t: t.grad),
            "params after Adam (worst)": worst(model.params, lambda t: t.detach())}
    ok = errs["loss"] < 1e-5 and errs["logits"] < 1e-4 and errs["grads (worst)"] < 1e-3 and \
        errs["params after Adam (worst)"] < 1e-3
    return ok, errs


def time_step(impl, base, depth, batch, size, tf32=False, steps=10):
    """ms per training step (median) of "minunet cupy" or the PyTorch twin, and the loss before and after."""
    x, y = random_batch(batch, size)
    if impl == "minunet cupy":
        import cupy

        be = get_backend("cupy", "float32")
        step, sync, warmup = minunet_stepper(UNet(1, base, depth, backend=be, seed=0), x, y), be.synchronize, 2
    else:
        import torch

        _torch_flags(tf32)
        torch.manual_seed(0)
        step, sync, warmup = torch_stepper(torch_twin(1, base, depth).cuda(), x, y), torch.cuda.synchronize, 3
    losses = []  # warm-up 3 for PyTorch: cudnn.benchmark autotunes on the first calls
    ms, reps = median_ms(lambda: losses.append(step()), sync, steps, warmup, budget_s=40.0)
    out = dict(ms=ms, reps=reps, loss_first=float(losses[0]), loss_last=float(losses[-1]))
    if impl == "minunet cupy":
        out["pool_gib"] = cupy.get_default_memory_pool().total_bytes() / 2**30
    return out


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
        for impl, tf32 in (("minunet cupy", False), ("pytorch fp32", False), ("pytorch tf32", True)):
            try:
                r = time_step(impl, base, depth, batch, size, tf32)
            except Exception as exc:
                r = dict(ms=None, reps=0, error=f"{type(exc).__name__}: {exc}")
            free_gpu_memory()  # the step's buffers are gone with its frame: hand them back
            r.update(base=base, impl=impl, batch=batch)
            rows.append(r)
            if r.get("ms"):
                r["img_s"] = batch * 1000.0 / r["ms"]
                r["epoch_s"] = EPOCH_IMAGES / r["img_s"]
                pool = f", pool {r['pool_gib']:.1f} GiB" if "pool_gib" in r else ""
                print(f"  base {base:<3} {impl:<13} {r['ms']:9.2f} ms/step {r['img_s']:8.1f} img/s "
                      f"epoch {r['epoch_s']:7.1f} s  loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}{pool}",
                      flush=True)
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
        lines.append(f"per-op check   : {len(rows) - len(bad)}/{len(rows)} OK vs numpy reference"
                     + (f"  NOT OK: {', '.join(bad)}" if bad else ""))
        lines.append(f"per-op time    : {step_sum_ms(rows):.2f} ms over the step, count x (fwd + bwd) "
                     "(base 16, depth 4, batch 8, 256x256)")
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
    train = load("gpu_train.json")
    if train:
        rate = train["steady_images_per_s"]
        lines.append("")
        lines.append(f"training       : {' -> '.join(train['statuses'])}; resume "
                     f"{'bit-identical' if train['resume_bit_identical'] else 'NOT bit-identical'}; "
                     + (f"{rate:.1f} img/s on the sample" if rate else "no rate"))
        for name, s in train["projected_epoch_train_s"].items():
            lines.append(f"  one epoch of {name}: {s:.0f} s of training")
    else:
        lines.append("training       : not run or failed (see above)")
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
    t0 = time.perf_counter()
    if a.what == "ops":
        rows = bench_ops()
        result = dict(rows=rows, seconds=time.perf_counter() - t0)
        name, ok = "gpu_ops.json", all(r["ok"] for r in rows)
    else:
        result = bench_step(bases=tuple(int(b) for b in a.bases.split(",")))
        result["seconds"] = time.perf_counter() - t0
        name, ok = "gpu_step.json", result["twin"]["ok"] and all(r.get("ms") for r in result["steps"])
    with open(os.path.join(a.json_dir, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"({a.what}: {time.perf_counter() - t0:.1f} s, wrote {os.path.join(a.json_dir, name)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
