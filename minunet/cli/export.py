"""``minunet export``: a weights-only copy of a checkpoint (optionally float16), e.g. to ship a model."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--float16/--float32", "half", default=True, show_default=True, help="Storage type of the weights.")
@click.option("--threshold", type=float, default=None,
              help="Store this probability threshold as the model's default (evaluate, predict, quantify).")
@click.option("--min-area", type=float, default=None,
              help="Store this minimum component area (share of the image) as the model's default.")
def export_cmd(checkpoint, out, half, threshold, min_area):
    """Write CHECKPOINT's weights and config to OUT without the optimizer state.

    \b
    OUT keeps the model config, the training recipe and record, and the split lists (from the run
    folder's split.json); every path of the training machine is reduced to its last two names
    (the data set's name, e.g. COVID-QU-Ex/Infection Segmentation Data).

    \b
    Examples:
      minunet export runs/lung/best.npz minunet/assets/model/lung_unet.npz
      minunet export runs/lung/best.npz lung32.npz --float32
      minunet export runs/inf/best.npz infection_unet.npz --threshold 0.6 --min-area 0.01
    """
    from pathlib import Path

    from minunet.checkpoint import export_checkpoint
    from minunet.cli.common import check_postprocess
    from minunet.errors import OutputError

    check_postprocess(threshold, min_area)
    if Path(out).is_dir():
        raise OutputError(f"{out} is a folder: give the file to write, e.g. {Path(out) / 'model.npz'}")
    pp = {k: v for k, v in (("threshold", threshold), ("min_area", min_area)) if v is not None}
    try:
        path = export_checkpoint(checkpoint, out, "float16" if half else None, pp)
    except OSError as e:  # reading errors are CheckpointErrors: this is the write (a full disk, a file in the path)
        raise OutputError(f"cannot write {out} ({e.strerror or e}): choose another path") from None
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {'float16' if half else 'float32'} weights)")
