"""``minunet summary``: the U-Net layer by layer (shape, parameters, FLOPs, activation memory)."""

from __future__ import annotations

import click

from minunet.cli.common import config_option


def summary_rows(model, size):
    """(layer, output shape for one image, parameters, FLOPs, activation bytes) in forward order.

    FLOPs count a multiply-add as 2: a k x k conv costs 2*Cin*k*k*Cout*H*W; the
    2x2 stride-2 up-conv 2*Cin*Cout*(2H)*(2W) (each output value is Cin
    multiply-adds); max-pool counts 3 comparisons per output value. Activations are float32
    (4 bytes) per value of the layer's output, for one image."""
    D, widths = model.depth, model.widths
    itemsize = 4

    def nparams(prefix):
        return sum(int(model.params[f"{prefix}.{p}"].size) for p in ("weight", "bias"))

    cin0 = model.in_channels
    rows, h, c = [("input", (1, cin0, size, size), 0, 0, cin0 * size * size * itemsize)], size, cin0

    def add(name, cout, hh, params, flops):
        rows.append((name, (1, cout, hh, hh), params, int(flops), cout * hh * hh * itemsize))

    for i in range(D):
        for j, cin in ((1, c), (2, widths[i])):
            add(f"enc{i}.conv{j} 3x3+relu", widths[i], h, nparams(f"enc{i}.conv{j}"), 2 * cin * 9 * widths[i] * h * h)
        c = widths[i]
        h //= 2
        add(f"pool{i} 2x2", c, h, 0, 3 * c * h * h)
    for j, cin in ((1, c), (2, widths[D])):
        flops = 2 * cin * 9 * widths[D] * h * h
        add(f"bottleneck.conv{j} 3x3+relu", widths[D], h, nparams(f"bottleneck.conv{j}"), flops)
    c = widths[D]
    for i in reversed(range(D)):
        h *= 2
        add(f"dec{i}.up 2x2 s2", widths[i], h, nparams(f"dec{i}.up"), 2 * c * widths[i] * h * h)
        add(f"dec{i}.concat skip", 2 * widths[i], h, 0, 0)
        for j, cin in ((1, 2 * widths[i]), (2, widths[i])):
            add(f"dec{i}.conv{j} 3x3+relu", widths[i], h, nparams(f"dec{i}.conv{j}"), 2 * cin * 9 * widths[i] * h * h)
        c = widths[i]
    add("head 1x1", 1, h, nparams("head"), 2 * c * 1 * h * h)
    return rows


def _human(n, unit=""):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


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
    from minunet.model import UNet, check_size

    if base_channels < 1 or depth < 1 or batch_size < 1:
        raise CliError("--base-channels, --depth and --batch-size must be >= 1")
    check_size(size, depth)
    model = UNet(1, base_channels, depth, backend="numpy")
    rows = summary_rows(model, size)
    w = max(len(r[0]) for r in rows)
    click.echo(f"U-Net: base {base_channels}, depth {depth}, input {size}x{size}, one image (N=1), float32")
    click.echo(f"{'layer':<{w}}  {'output shape':<22}{'params':>10}  {'FLOPs':>11}  {'activations':>11}")
    for name, shape, p, f, a in rows:
        click.echo(f"{name:<{w}}  {str(shape):<22}{p:>10,}  {_human(f):>11}  {_human(a, 'B'):>11}")
    total_p, total_f, total_a = (sum(r[k] for r in rows) for k in (2, 3, 4))
    assert total_p == model.num_params()
    click.echo(f"total parameters      {total_p:,} ({_human(total_p * 4, 'B')} as float32)")
    click.echo(f"forward FLOPs/image   {_human(total_f)}; a training step is about 3x: {_human(3 * total_f)}")
    click.echo(f"activations/image     {_human(total_a, 'B')} (the outputs kept for backward); "
               f"batch {batch_size}: {_human(batch_size * total_a, 'B')}")
