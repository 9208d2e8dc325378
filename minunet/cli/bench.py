"""``minunet bench``: validate every kernel against the reference, time it, then time the training step;
or, with ``--widths`` / ``--inference``, the step or the forward pass at several widths, each in a fresh process."""

from __future__ import annotations

import click

from minunet.cli.common import strict_json


def _widths(ctx, param, value):
    """'16,32,64' -> (16, 32, 64); None stays None."""
    if value is None:
        return None
    try:
        widths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of widths, e.g. 16,32,64") from None
    if not widths or min(widths) < 1:
        raise click.BadParameter(f"{value!r}: every width must be >= 1")
    return widths


def _range(values):
    """[95.1, 97.9] -> '95-98'; one value -> '95'; none -> '-'."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = f"{min(values):.0f}", f"{max(values):.0f}"
    return lo if lo == hi else f"{lo}-{hi}"


@click.command("bench")
@click.option("--backend", type=click.Choice(["numba", "numpy", "cupy"], case_sensitive=False), default="numba",
              show_default=True, help="Backend to benchmark.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per batch. [default: 8; with --widths or --inference: 8 up to base 32, 4 above]")
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True,
              help="Image height and width (a multiple of 2**depth).")
@click.option("--base", type=click.IntRange(min=1), default=16, show_default=True, help="Base channels.")
@click.option("--depth", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats per measurement (the median is reported).")
@click.option("--ops/--no-ops", default=True, show_default=True,
              help="Per-op table (validate, then time); not with --widths or --inference.")
@click.option("--torch/--no-torch", "torch_compare", default=True, show_default=True,
              help="Also time the same step in PyTorch when it is importable.")
@click.option("--widths", callback=_widths, default=None, metavar="W1,W2,...",
              help="Time the step at each base width (e.g. 16,32,64), minunet and PyTorch each alone in a "
                   "fresh process, so each peak memory is its own; one table, no per-op table.")
@click.option("--inference", is_flag=True,
              help="Time the forward pass only (minunet's inference path, PyTorch under inference_mode), "
                   "at --base or each of --widths, in fresh processes as --widths.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def bench(backend, batch_size, size, base, depth, repeats, ops, torch_compare, widths, inference, as_json):
    """Per-op table (ms, GFLOP/s, share of the sgemm ceiling, error vs the NumPy reference), then the
    full training step (forward, BCE, backward, Adam) in images/s and GFLOP/s, its peak memory and,
    with PyTorch installed, the ratio to PyTorch's channels_last step.

    The sgemm ceiling is a 2048x2048 float32 np.dot timed in the same run; a step counts 3x the
    FLOPs of its forward (convolutions and up-convolutions, 2 per multiply-add). The OpenBLAS
    setting (OPENBLAS_CORETYPE, and the kernels OpenBLAS chose) is printed with the results."""
    from minunet import bench as lib
    from minunet import bench_widths, heap
    from minunet.kernels import open_backend

    if size % 2**depth:
        raise click.BadParameter(f"{size} is not divisible by 2**depth = {2**depth}", param_hint="--size")
    be, _ = open_backend(backend, "float32")  # a ConfigError becomes one line, exit 2
    kept = heap.keep_freed_memory()  # as every minunet command (benchmarks/bench_step.py comes here directly)

    progress = None if as_json else (lambda msg: click.echo(f"  ... {msg}", err=True))
    blas = lib.blas_setting()
    sgemm = lib.sgemm_ceiling() if be.name != "cupy" else None  # a CPU product is no ceiling for a GPU
    ceiling = sgemm["gflops"] if sgemm else None
    from minunet.kernels.numba import conv as numba_conv

    blocks = numba_conv.VARIANT  # the numba direct kernels' register blocks: "wide" (AVX-512) or "narrow"
    result = {"backend": be.name, "base": base, "depth": depth, "size": size, "blas": blas, "sgemm": sgemm,
              "numba_direct_blocks": blocks, "keeps_freed_memory": kept}
    if not as_json:
        click.echo(f"OpenBLAS: OPENBLAS_CORETYPE {blas['OPENBLAS_CORETYPE']}, "
                   f"kernels {blas['openblas_corename'] or 'unknown (not NumPy-bundled OpenBLAS)'}; "
                   f"numba direct kernels: {blocks} blocks ({'AVX-512' if blocks == 'wide' else 'AVX2'})")
        fresh = widths is not None or inference  # PyTorch in a fresh process of its own, else in this one
        click.echo("allocator: " + (("freed memory kept for the next step (minunet/heap.py) in minunet's processes; "
                                     "PyTorch's keep glibc's defaults") if kept and fresh else
                                    ("freed memory kept for the next step (minunet/heap.py), for minunet and the "
                                     "interleaved PyTorch step alike (one process)") if kept else
                                    "the system's defaults"))
        if sgemm:
            click.echo(f"sgemm ceiling: {sgemm['gflops']:.1f} GFLOP/s ({sgemm['n']}x{sgemm['n']} float32 np.dot, "
                       f"{sgemm['ms']:.1f} ms, median of 5)")

    if widths is not None or inference:
        mode = "inference" if inference else "step"
        rows = bench_widths.width_table(widths or (base,), depth, size, repeats, batch_size, mode, be.name,
                               torch_compare, progress)
        for r in rows:
            lib.add_sgemm_share(r, ceiling)
        result.update(mode=mode, repeats=repeats, widths=rows)
        if as_json:
            click.echo(strict_json(result, indent=2))
        else:
            what = ("training step (forward + BCE + backward + Adam)" if mode == "step"
                    else "inference (forward pass only)")
            click.echo(f"{what}, {be.name}, float32, {size}x{size}, depth {depth}; minunet and PyTorch each alone "
                       f"in a fresh process, median of {repeats}")
            click.echo(bench_widths.format_width_table(rows))
            click.echo(f"GFLOP: {'3x ' if mode == 'step' else ''}the forward's convolutions and up-convolutions "
                       "(2 per multiply-add); GFLOP/s and % sgemm are minunet's. Peak MiB: ru_maxrss of each "
                       f"process, imports included (before the model: minunet "
                       f"{_range(r['minunet_rss_before_mb'] for r in rows)}, PyTorch "
                       f"{_range(r['torch_rss_before_mb'] for r in rows)} MiB)")
            versions = {r["torch_version"] for r in rows if r["torch_version"]}
            if versions:
                click.echo("; ".join(sorted(versions)))
            elif torch_compare:
                click.echo("PyTorch is not importable here: no comparison (it is never a dependency)")
        failed = [r[k] for r in rows for k in ("minunet_error", "torch_error") if k in r]
        if failed:
            raise click.ClickException(f"{len(failed)} measurement(s) failed: {'; '.join(failed)}")
        return

    batch_size = batch_size or 8
    result["shape"] = f"{batch_size}x1x{size}x{size}"
    if ops:
        rows = lib.op_table(be, base, depth, batch_size, size, repeats, progress=progress)
        for r in rows:
            lib.add_sgemm_share(r, ceiling)
        result["ops"] = rows
        if not as_json:
            click.echo(f"per-op, {be.name}, float32, batch {batch_size}, {size}x{size}, base {base}, depth {depth} "
                       f"(median of {repeats}; validated vs numpy on a crop; %sg: share of the sgemm ceiling)")
            click.echo(lib.format_op_table(rows))
    step = lib.add_sgemm_share(
        lib.train_step(be, base, depth, batch_size, size, repeats, torch_compare=torch_compare, progress=progress),
        ceiling)
    result["step"] = step
    if as_json:
        click.echo(strict_json(result, indent=2))
        return
    share = f", {step['pct_sgemm']:.0f}% of sgemm" if step["pct_sgemm"] is not None else ""
    click.echo(f"training step (forward + BCE + backward + Adam): {step['step_ms']:.0f} ms, "
               f"{step['images_per_s']:.2f} images/s; first step {step['first_step_s']:.2f} s")
    click.echo(f"step arithmetic: {step['step_gflop']:.4g} GFLOP (3x the forward's convolutions and "
               f"up-convolutions) = {step['gflops']:.1f} GFLOP/s{share}")
    click.echo(f"peak memory (ru_maxrss, whole process, before PyTorch): {step['peak_rss_mb']:.0f} MiB "
               f"(was {step['rss_before_mb']:.0f} MiB before building the model)")
    if "ratio" in step:
        click.echo(f"PyTorch {step['torch_version']} channels_last, {step['torch_threads']} threads: "
                   f"{step['torch_step_ms']:.0f} ms/step; minunet interleaved with it: "
                   f"{step['interleaved_step_ms']:.0f} ms/step; ratio minunet/PyTorch = {step['ratio']:.2f}x")
    elif torch_compare:
        click.echo("PyTorch is not importable here: no comparison (it is never a dependency)")
    bad = [r["op"] for r in result.get("ops", []) if not r["ok"]]
    if bad:
        raise click.ClickException(f"{len(bad)} op(s) disagree with the reference: {', '.join(bad)}")
