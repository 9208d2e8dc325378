"""The U-Net's training step, or its forward pass alone, at several base widths: ``minunet bench
--widths`` and ``--inference``.

Every measurement (minunet or PyTorch, one width) runs as the only work of a
fresh Python process (``measure_fresh`` runs ``measure``), so the peak memory
it reports (``ru_maxrss``) is that measurement's alone, and no library one side
loaded (Numba, PyTorch) weighs on the other. The processes run one after the
other, so their times are not interleaved: run on a quiet machine. The
steppers, the timer and the FLOP counts are ``bench.py``'s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from minunet import heap
from minunet.bench import (
    cpu_threads,
    forward_flops,
    median_ms,
    minunet_forward,
    minunet_stepper,
    or_dash,
    peak_rss_mb,
    random_batch,
    step_flops,
)
from minunet.kernels import get_backend
from minunet.model import UNet

MODES = ("step", "inference")


def default_batch(base):
    """The batch of ``width_table`` when none is given: 8 up to base 32, 4 above (base 64 at batch 8
    needs about twice the memory for the same images/s)."""
    return 8 if base <= 32 else 4


def measure(impl, mode, base, depth, batch, size, repeats, backend="numba"):
    """Time one implementation alone, as the only work of its process (``measure_fresh``), so that
    the process's peak memory is this measurement's.

    impl: "minunet" (on ``backend``) or "torch" (PyTorch on the CPU, channels_last, ``cpu_threads``
    threads); mode: "step" (zero_grad, forward, BCE, backward, Adam) or "inference" (the forward
    pass alone: minunet's ``train=False``, PyTorch's under ``inference_mode``). Returns dict ms
    (median of ``repeats`` after the first call), first_s (that first call), peak_rss_mb
    (ru_maxrss at the end: imports, kernel loading and the libraries included) and rss_before_mb
    (ru_maxrss once the libraries are imported, before the model and the batch exist), version."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if impl == "minunet":
        heap.keep_freed_memory()  # as the command line does; PyTorch's process keeps glibc's defaults
        be = get_backend(backend, "float32")
        rss0 = peak_rss_mb()
        x, y = random_batch(batch, size)
        model = UNet(1, base, depth, backend=be, dtype="float32", seed=0)
        fn = minunet_stepper(model, x, y) if mode == "step" else minunet_forward(model, x)
        sync, version = be.synchronize, be.name
    elif impl == "torch":
        import torch

        from minunet.torch_twin import torch_forward, torch_stepper, torch_twin

        torch.set_num_threads(cpu_threads())
        torch.manual_seed(0)
        rss0 = peak_rss_mb()
        x, y = random_batch(batch, size)
        tmodel = torch_twin(1, base, depth)
        fn = (torch_stepper(tmodel, x, y, channels_last=True) if mode == "step"
              else torch_forward(tmodel, x, channels_last=True))
        sync, version = None, f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, channels_last"
    else:
        raise ValueError(f"impl must be 'minunet' or 'torch', got {impl!r}")
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    first_s = time.perf_counter() - t0
    ms, n = median_ms(fn, sync, repeats, warmup=0)  # the first call above was the warm-up
    return dict(impl=impl, mode=mode, ms=ms, repeats=n, first_s=first_s, peak_rss_mb=peak_rss_mb(),
                rss_before_mb=rss0, version=version)


_CHILD = ("import json, sys; from minunet.bench_widths import measure; "
          "print(json.dumps(measure(**json.loads(sys.argv[1]))))")


def measure_fresh(**kwargs):
    """``measure(**kwargs)`` in a fresh Python process (this interpreter, this environment, this
    minunet), so the peak memory it reports is that measurement's alone. Returns its dict, or
    {"error": the child's last line of stderr} when the child failed (killed for memory, say)."""
    root = str(Path(__file__).resolve().parents[1])  # the child imports the same minunet
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": f"{kwargs['impl']} (exit status {done.returncode}): {why}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_importable():
    """Whether ``import torch`` would find a package (without importing it here)."""
    return importlib.util.find_spec("torch") is not None


def width_table(widths=(16, 32, 64), depth=4, size=256, repeats=5, batch=None, mode="step", backend="numba",
                torch_compare=True, progress=None):
    """The step (mode "step") or the forward pass (mode "inference") of the U-Net at each base width
    in ``widths``, minunet and PyTorch each measured alone in a fresh process (``measure_fresh``),
    one after the other; their times are not interleaved, so run it on a quiet machine.

    ``batch``: the batch at every width; None: ``default_batch(base)``. Returns one row per
    width: base, batch, gflop (``step_flops`` or ``forward_flops``), minunet_ms, gflops (minunet's
    rate), minunet_peak_mb, minunet_rss_before_mb and, where PyTorch ran, torch_ms,
    torch_peak_mb, torch_rss_before_mb, torch_version and ratio (minunet / PyTorch time); a
    missing PyTorch leaves those None; a failed process leaves its measurement None and its
    message in minunet_error or torch_error."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    count = step_flops if mode == "step" else forward_flops
    with_torch = torch_compare and torch_importable()
    rows = []
    for base in widths:
        n = batch or default_batch(base)
        flops = count(base, depth, n, size)
        row = dict(base=base, batch=n, size=size, depth=depth, mode=mode, gflop=flops / 1e9)
        for impl in ("minunet", "torch"):
            got = None
            if impl == "minunet" or with_torch:
                if progress:
                    progress(f"base {base}, batch {n}: {impl} {mode} in a fresh process")
                got = measure_fresh(impl=impl, mode=mode, base=base, depth=depth, batch=n, size=size,
                                    repeats=repeats, backend=backend)
            ok = got is not None and "error" not in got
            row.update({f"{impl}_ms": got["ms"] if ok else None,
                        f"{impl}_peak_mb": got["peak_rss_mb"] if ok else None,
                        f"{impl}_rss_before_mb": got["rss_before_mb"] if ok else None})
            if got is not None and not ok:
                row[f"{impl}_error"] = got["error"]
            if impl == "torch":
                row["torch_version"] = got["version"] if ok else None
        row["gflops"] = flops / row["minunet_ms"] / 1e6 if row["minunet_ms"] else None
        row["ratio"] = row["minunet_ms"] / row["torch_ms"] if row["minunet_ms"] and row["torch_ms"] else None
        rows.append(row)
    return rows


def format_width_table(rows):
    """The width table as text: base | batch | GFLOP | minunet ms | PyTorch ms | ratio | both peaks |
    GFLOP/s | % sgemm ('-' where a value is missing), then a line per failed measurement."""
    lines = [f"{'base':>4} {'batch':>5} {'GFLOP':>7} {'minunet ms':>10} {'PyTorch ms':>10} {'ratio':>6} "
             f"{'minunet peak MiB':>16} {'PyTorch peak MiB':>16} {'GFLOP/s':>7} {'% sgemm':>7}"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(f"{r['base']:>4} {r['batch']:>5} {r['gflop']:>7.1f} {or_dash(r['minunet_ms'], '.0f'):>10} "
                     f"{or_dash(r['torch_ms'], '.0f'):>10} {ratio:>6} {or_dash(r['minunet_peak_mb'], '.0f'):>16} "
                     f"{or_dash(r['torch_peak_mb'], '.0f'):>16} {or_dash(r['gflops'], '.1f'):>7} "
                     f"{or_dash(r.get('pct_sgemm'), '.0f'):>7}")
    for r in rows:
        lines += [f"base {r['base']}: {r[k]}" for k in ("minunet_error", "torch_error") if k in r]
    return "\n".join(lines)
