"""``minunet export``: a weights-only copy of a checkpoint (its precision, or float16/float32), as .npz,
.safetensors or ONNX."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["npz", "safetensors", "onnx"]), default=None,
              show_default="from OUT's suffix, else npz", help="File format of OUT.")
@click.option("--float16/--float32", "half", default=None, show_default="the checkpoint's own",
              help="Storage type of the weights (float16 halves the file; a shipped model uses it).")
@click.option("--threshold", type=float, default=None,
              help="Store this probability threshold as the model's default (evaluate, predict, quantify).")
@click.option("--min-area", type=float, default=None,
              help="Store this minimum component area (share of the image) as the model's default.")
@click.option("--view-shift", type=click.IntRange(min=0), default=None,
              help="Store this shift (pixels) as the model's default for shifted views at predict time: the "
                   "probability averaged over the image and four copies shifted up, down, left, right (0: off).")
@click.option("--sigmoid", is_flag=True, help="ONNX: end the graph with a Sigmoid (probabilities, not logits).")
@click.option("--dynamic", is_flag=True,
              help="ONNX: any batch size and image size (multiples of 2**depth) instead of 1 x 1 x SIZE x SIZE.")
@click.option("--widen", type=click.IntRange(min=1), default=1, show_default=True,
              help="Write a model of this many times the base width that computes the same "
                   "(Net2WiderNet; with --float32, else up to float16 rounding): a start for "
                   "training a wider model with train --init.")
@click.option("--deepen", is_flag=True,
              help="Write a model one level deeper (one more pooling) that computes the same (the new level "
                   "starts as the identity on its skip; with --float32, else up to float16 rounding): a start "
                   "for training a deeper model with train --depth D+1 --init.")
def export_cmd(checkpoint, out, fmt, half, threshold, min_area, view_shift, sigmoid, dynamic, widen, deepen):
    """Write CHECKPOINT's weights and config to OUT without the optimizer state, and OUT's config
    (architecture, input size, post-processing, training recipe) beside it as OUT with .json.

    \b
    Formats:
      npz          minunet's own; keeps the training record and the split lists (from the run
                   folder's split.json); every path of the training machine is reduced to its
                   last two names (the data set's name, e.g. COVID-QU-Ex/Infection Segmentation Data)
      safetensors  the weights under PyTorch's names and layouts (load_state_dict takes them), the
                   record in its metadata; minunet reads it back wherever it takes a model
      onnx         the forward graph (opset 17) for ONNX Runtime and other tools (pip install
                   'minunet[onnx]'); input 'image' 1 x 1 x SIZE x SIZE (the training size)

    \b
    Examples:
      minunet export runs/lung/best.npz minunet/assets/model/lung_unet.npz --float16
      minunet export runs/lung/best.npz lung32.npz
      minunet export runs/inf/best.npz infection_unet.npz --float16 --threshold 0.6 --min-area 0.01
      minunet export runs/lung/best.npz lung_unet.npz --float16 --min-area 0.02 --view-shift 6
      minunet export lung_unet.npz lung_unet.safetensors
      minunet export lung_unet.npz lung_unet.onnx --float32 --sigmoid --dynamic
      minunet export infection_unet.npz wide32.npz --float32 --widen 2
        (then: minunet train --base-channels 32 --init wide32.npz ...)
      minunet export lung_unet.npz deep5.npz --float32 --deepen
        (then: minunet train --depth 5 --init deep5.npz ...)
    """
    import json
    from pathlib import Path

    from minunet.checkpoint import config_path, export_checkpoint, format_of
    from minunet.cli.common import check_postprocess
    from minunet.errors import ConfigError, OutputError

    check_postprocess(threshold, min_area)
    fmt = format_of(out, fmt)
    if (sigmoid or dynamic) and fmt != "onnx":
        raise ConfigError(f"--sigmoid and --dynamic shape an ONNX graph, but OUT is written as {fmt}: "
                          "add --format onnx (or name OUT .onnx)")
    if Path(out).is_dir():
        raise OutputError(f"{out} is a folder: give the file to write, e.g. {Path(out) / ('model.' + fmt)}")
    pp = {k: v for k, v in (("threshold", threshold), ("min_area", min_area), ("view_shift", view_shift))
          if v is not None}
    try:
        path = export_checkpoint(checkpoint, out, {True: "float16", False: "float32", None: "keep"}[half], pp, fmt,
                                 sigmoid, dynamic, widen, deepen)
    except OSError as e:  # reading errors are CheckpointErrors: this is the write (a full disk, a file in the path)
        raise OutputError(f"cannot write {out} ({e.strerror or e}): choose another path") from None
    dtype = json.loads(config_path(path).read_text())["files"][path.name]["weights_dtype"]
    click.echo(f"wrote {path} ({fmt}, {path.stat().st_size / 1e6:.2f} MB, {dtype} weights) and {config_path(path)}")
