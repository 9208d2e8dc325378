"""``minunet summary``: the U-Net layer by layer (shape, parameters, FLOPs, activation memory)."""

from __future__ import annotations

import click

from minunet.cli.common import config_option


@click.command("summary")
@config_option("--base-channels", type=int)
@config_option("--depth", type=int)
@config_option("--size", type=int)
@config_option("--batch-size", type=int, help="For the memory total of a batch.")
def summary_cmd(base_channels, depth, size, batch_size):
    """Show the U-Net layer by layer: output shape, parameters, FLOPs, activation memory (float32).

    \b
    Examples:
      minunet summary
      minunet summary --base-channels 32 --depth 5 --size 512
    """
    from minunet.cli.errors import CliError
    from minunet.footprint import human, kept_rows, layer_rows
    from minunet.model import check_size

    if base_channels < 1 or depth < 1 or batch_size < 1:
        raise CliError("--base-channels, --depth and --batch-size must be >= 1")
    check_size(size, depth)
    rows = layer_rows(1, base_channels, depth, size)  # computed, not built: any width can be shown
    w = max(len(r[0]) for r in rows)
    click.echo(f"U-Net: base {base_channels}, depth {depth}, input {size}x{size}, one image (N=1), float32")
    click.echo(f"{'layer':<{w}}  {'output shape':<22}{'params':>10}  {'FLOPs':>11}  {'activations':>11}")
    for name, shape, p, f, a in rows:
        click.echo(f"{name:<{w}}  {str(shape):<22}{p:>10,}  {human(f):>11}  {human(a, 'B'):>11}")
    total_p, total_f, total_a = (sum(r[k] for r in rows) for k in (2, 3, 4))
    click.echo(f"total parameters      {total_p:,} ({human(total_p * 4, 'B')} as float32)")
    click.echo(f"forward FLOPs/image   {human(total_f)}; a training step is about 3x: {human(3 * total_f)}")
    kept = sum(r.activation_bytes for r in kept_rows(rows))
    click.echo(f"activations/image     {human(total_a, 'B')}, of which kept for backward {human(kept, 'B')} (each "
               f"encoder level's last output lives on in its decoder's [skip | up] buffer); "
               f"batch {batch_size}: {human(batch_size * kept, 'B')} kept")
