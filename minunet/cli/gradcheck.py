"""``minunet gradcheck``: every op and the whole network against finite differences, in float64."""

from __future__ import annotations

import click


@click.command("gradcheck")
@click.option("--backend", type=click.Choice(["numpy", "numba"], case_sensitive=False), default="numpy",
              show_default=True)
@click.option("--depth", type=int, default=2, show_default=True, help="Depth of the network checked (base 3).")
@click.option("--seed", type=int, default=0, show_default=True)
def gradcheck_cmd(backend, depth, seed):
    """Check every backward pass against central differences (float64); exit 1 on any NOT OK.

    \b
    The network check uses base 3, random biases and 2 small non-square images.
    Examples:
      minunet gradcheck
      minunet gradcheck --backend numba --depth 3
    """
    import numpy as np

    from minunet.cli.errors import CliError
    from minunet.gradcheck import check_network, check_ops, format_table, randomize_biases
    from minunet.kernels import open_backend
    from minunet.model import UNet

    if not 1 <= depth <= 5:
        raise CliError(f"--depth must be between 1 and 5, got {depth}")
    be, _ = open_backend(backend, "float64")
    click.echo(f"backend {be.name}, float64")
    ops = check_ops(be, seed=seed)
    click.echo("ops (vector-Jacobian products vs central differences, h=1e-6):")
    click.echo(format_table(ops))
    f = 2**depth
    h, w = 2 * f, 3 * f
    model = UNet(1, 3, depth, backend=be, dtype="float64", seed=seed)
    randomize_biases(model, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 1, h, w))
    y = (rng.random((2, 1, h, w)) > 0.5).astype(np.float64)
    net = check_network(model, x, y, seed=seed)
    click.echo(f"\nnetwork (base 3, depth {depth}, input 2x1x{h}x{w}, BCE; directional derivatives, h=1e-7):")
    click.echo(format_table(net))
    bad = [r.name for r in ops + net if not r.ok]
    if bad:
        click.echo(f"\nNOT OK: {len(bad)} of {len(ops) + len(net)} checks ({', '.join(bad[:5])})")
        raise SystemExit(1)
    click.echo(f"\nall {len(ops) + len(net)} checks OK")
