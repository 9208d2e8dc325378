"""``minunet bench``: validate every kernel against the reference, time it, then time the training step."""

from __future__ import annotations

import click

from minunet.cli.common import strict_json


@click.command("bench")
@click.option("--backend", type=click.Choice(["numba", "numpy", "cupy"], case_sensitive=False), default="numba",
              show_default=True, help="Backend to benchmark.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True,
              help="Image height and width (a multiple of 2**depth).")
@click.option("--base", type=click.IntRange(min=1), default=16, show_default=True, help="Base channels.")
@click.option("--depth", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats per measurement (the median is reported).")
@click.option("--ops/--no-ops", default=True, show_default=True, help="Per-op table (validate, then time).")
@click.option("--torch/--no-torch", "torch_compare", default=True, show_default=True,
              help="Also time the same step in PyTorch when it is importable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def bench(backend, batch_size, size, base, depth, repeats, ops, torch_compare, as_json):
    """Per-op table (ms, GFLOP/s, error vs the NumPy reference), then the full training step
    (forward, BCE, backward, Adam) in images/s, its peak memory and, with PyTorch installed,
    the ratio to PyTorch's channels_last step."""
    from minunet import bench as lib
    from minunet.kernels import open_backend

    if size % 2**depth:
        raise click.BadParameter(f"{size} is not divisible by 2**depth = {2**depth}", param_hint="--size")
    be, _ = open_backend(backend, "float32")  # a ConfigError becomes one line, exit 2

    progress = None if as_json else (lambda msg: click.echo(f"  ... {msg}", err=True))
    result = {"backend": be.name, "shape": f"{batch_size}x1x{size}x{size}", "base": base, "depth": depth}
    if ops:
        rows = lib.op_table(be, base, depth, batch_size, size, repeats, progress=progress)
        result["ops"] = rows
        if not as_json:
            click.echo(f"per-op, {be.name}, float32, batch {batch_size}, {size}x{size}, base {base}, depth {depth} "
                       f"(median of {repeats}; validated vs numpy on a crop)")
            click.echo(lib.format_op_table(rows))
    step = lib.train_step(be, base, depth, batch_size, size, repeats, torch_compare=torch_compare, progress=progress)
    result["step"] = step
    if as_json:
        click.echo(strict_json(result, indent=2))
        return
    click.echo(f"training step (forward + BCE + backward + Adam): {step['step_ms']:.0f} ms, "
               f"{step['images_per_s']:.2f} images/s; first step {step['first_step_s']:.2f} s")
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
