"""``minunet predict``: segment images, write masks and overlays."""

from __future__ import annotations

from pathlib import Path

import click

from minunet.cli.common import BACKENDS, DEFAULT_MODEL, Bar, load_model


def collect_inputs(inputs):
    """Image files from INPUT arguments: files, folders of images, folders with images/, dataset folders."""
    from minunet.data import IMAGE_EXTS, find_data, list_images, subdir
    from minunet.errors import DataError

    files = []
    for arg in inputs:
        p = Path(arg).expanduser()
        if not p.exists():
            raise DataError(f"input {p} does not exist: pass image files or folders of images")
        if p.is_dir():
            found = list_images(p)
            if not found and subdir(p, "images") is not None:
                found = list_images(subdir(p, "images"))
            if not found:  # a dataset folder (COVID-QU-Ex or split generic): every image in it
                try:
                    found = [it.image for it in find_data(p, require_masks=False).items()]
                except DataError:
                    found = []
            if not found:
                raise DataError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)}): pass image files")
            files += found
        else:
            files.append(p)
    return files


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", type=click.Path(path_type=str), required=True, help="Folder for the masks and overlays.")
@click.option("--model", "model_path", type=click.Path(path_type=str), default=str(DEFAULT_MODEL),
              show_default="the shipped lung model", help="Checkpoint (.npz) written by 'minunet train'.")
@click.option("--threshold", type=float, default=0.5, show_default=True)
@click.option("--keep-largest", type=int, default=0, show_default=True,
              help="Keep only the K largest connected components (2 for lungs; 0: all).")
@click.option("--size", type=int, default=None, help="Model input size [default: the size it was trained at].")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
def predict_cmd(inputs, out, model_path, threshold, keep_largest, size, batch_size, backend):
    """Segment INPUT images: writes <name>_mask.png (0/255, at the image's own size) and <name>_overlay.png.

    \b
    Examples:
      minunet predict xray.png --out pred/
      minunet predict scans/ --out pred/ --keep-largest 2 --model runs/lung/best.npz
    """
    import numpy as np
    from PIL import Image

    from minunet.cli.errors import CliError
    from minunet.data import read_gray
    from minunet.inference import probabilities
    from minunet.model import check_size
    from minunet.postprocess import keep_largest as keep_k
    from minunet.postprocess import overlay

    if not 0 < threshold < 1:
        raise CliError(f"--threshold must be between 0 and 1, got {threshold}")
    if keep_largest < 0 or batch_size < 1:
        raise CliError("--keep-largest must be >= 0 and --batch-size >= 1")
    files = collect_inputs(inputs)
    model, ck, note = load_model(model_path, backend.lower())
    if note:
        click.echo(f"note: {note}", err=True)
    size = size or int(ck.meta.get("train_config", {}).get("size", 256))
    check_size(size, model.depth)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used = set()
    bar = Bar()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        grays = [read_gray(f) for f in chunk]
        for f, g, p in zip(chunk, grays, probabilities(model, grays, size, batch_size), strict=True):
            m = keep_k(p > threshold, keep_largest)
            name = f.stem
            k = 2
            while name in used:
                name, k = f"{f.stem}_{k}", k + 1
            used.add(name)
            Image.fromarray((m * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
            Image.fromarray(overlay(g, m)).save(out / f"{name}_overlay.png")
        bar.update("predicting", min(start + batch_size, len(files)), len(files))
    bar.clear()
    click.echo(f"wrote {len(files)} mask(s) and overlay(s) to {out}")
