"""``minunet export``: a weights-only copy of a checkpoint (optionally float16), e.g. to ship a model."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--float16/--float32", "half", default=True, show_default=True, help="Storage type of the weights.")
def export_cmd(checkpoint, out, half):
    """Write CHECKPOINT's weights and config to OUT without the optimizer state.

    \b
    Examples:
      minunet export runs/lung/best.npz minunet/assets/model/lung_unet.npz
      minunet export runs/lung/best.npz lung32.npz --float32
    """
    from minunet.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(checkpoint)
    model = ck.build_model("numpy")
    meta = {k: v for k, v in ck.meta.items() if k not in ("model", "weights_dtype", "has_optimizer")}
    meta["exported_from"] = str(ck.path)
    path = save_checkpoint(out, model, None, meta, weights_dtype="float16" if half else None)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {'float16' if half else 'float32'} weights)")
