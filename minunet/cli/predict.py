"""``minunet predict``: segment images, write masks and overlays."""

from __future__ import annotations

from pathlib import Path

import click

from minunet.cli.common import (
    BACKENDS,
    MASKS,
    VIEW_SHIFT_HELP,
    Bar,
    check_postprocess,
    config_option,
    load_model,
    output_stem,
    postprocess_of,
    shipped_model,
    unique_name,
    view_shift_of,
)
from minunet.evaluation import THRESHOLD

OUTPUT_SUFFIXES = ("_mask", "_overlay", "_prob", "_quantify")  # <name><suffix>.png: what predict and quantify write


def is_own_output(path: Path, out: Path | None) -> bool:
    """True for a file predict or quantify wrote into ``out``: a <name>_mask/_overlay/_prob/_quantify .png in that
    folder. Such a file is never read back as an input, so --out may be the input folder itself."""
    return (out is not None and path.suffix.lower() == ".png" and path.stem.endswith(OUTPUT_SUFFIXES)
            and path.parent.resolve() == out.resolve())


def collect_inputs(inputs, out=None):
    """Image files from INPUT arguments: files, folders of images, folders with images/, dataset folders (with
    or without masks, e.g. COVID-QU-Ex's Test split); never what predict or quantify wrote to ``out``."""
    from minunet.data import IMAGE_EXTS, find_data, list_images, subdir
    from minunet.errors import DataError

    out = Path(out).expanduser() if out is not None else None
    files = []
    for arg in inputs:
        p = Path(arg).expanduser()
        if not p.exists():
            raise DataError(f"input {p} does not exist: pass image files or folders of images")
        if p.is_dir():
            found = [f for f in list_images(p) if not is_own_output(f, out)]
            if not found and subdir(p, "images") is not None:
                found = [f for f in list_images(subdir(p, "images")) if not is_own_output(f, out)]
            if not found and any(c.is_dir() for c in p.iterdir()):
                # a dataset folder (COVID-QU-Ex or split generic): every image in it. When it is not one,
                # find_data's error says why (no images below, an unreadable folder...): pass it on.
                try:
                    found = [it.image for it in find_data(p, require_masks=False).items()
                             if not is_own_output(it.image, out)]
                except DataError as e:
                    raise DataError(f"folder {p} holds no images itself; read as a data folder: {e}") from None
            if not found:
                raise DataError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)}): pass image files")
            files += found
        elif not is_own_output(p, out):
            files.append(p)
    if not files:
        written = "/".join(OUTPUT_SUFFIXES)
        raise DataError(f"every input is a file that predict or quantify wrote to {out} (<name>{written}.png): "
                        "pass the original images")
    return files


def output_names(files) -> list:
    """Each input file's output name: its ``output_stem``, made unique over the whole list in order (``a``,
    ``a_2``...). Every rank computes them from the full list, so the names do not depend on how many ranks
    share the inputs, and two ranks never write the same file."""
    used = set()
    return [unique_name(output_stem(f), used) for f in files]


def read_images(named, skip_bad: bool, skipped: list):
    """[(name, (H, W) uint8 image)] of the (file, name) pairs in ``named`` whose file can be read. An
    unreadable one is a DataError, or, with ``skip_bad``, appended to ``skipped`` as (file, why) and left out."""
    from minunet.data import read_gray
    from minunet.errors import DataError

    read = []
    for f, name in named:
        try:
            read.append((name, read_gray(f)))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e}, or pass --skip-bad to go on without it") from None
            skipped.append((f, str(e)))
    return read


def report_skipped(skipped, shown=20):
    """One 'skipped ...' line on stderr per file left out (the first ``shown``, then a count)."""
    for _, why in skipped[:shown]:
        click.echo(f"skipped: {why}", err=True)
    if len(skipped) > shown:
        click.echo(f"skipped: {len(skipped) - shown} more unreadable file(s)", err=True)


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", type=click.Path(path_type=str), required=True, help="Folder for the masks and overlays.")
@click.option("--model", "model_path", type=click.Path(path_type=str), default=None,
              show_default="the shipped model of --mask",
              help="Checkpoint (.npz) of 'minunet train', or a .safetensors of 'minunet export'.")
@config_option("--mask", type=MASKS, help="Which shipped model segments, when --model is not given.")
@click.option("--threshold", type=float, default=None, show_default=f"the model's, else {THRESHOLD}",
              help="Foreground where sigmoid(logit) > THRESHOLD.")
@click.option("--min-area", type=float, default=None, show_default="the model's, else 0",
              help="Drop predicted components smaller than this share of the image (e.g. 0.01).")
@click.option("--view-shift", type=int, default=None, show_default="the model's, else 0", help=VIEW_SHIFT_HELP)
@click.option("--keep-largest", type=int, default=0, show_default=True,
              help="Keep only the K largest connected components (2 for lungs; 0: all).")
@click.option("--size", type=int, default=None, help="Model input size [default: the size it was trained at].")
@click.option("--no-overlay", is_flag=True, help="Write the masks only, no <name>_overlay.png.")
@click.option("--save-prob", is_flag=True,
              help="Also write <name>_prob.png: the foreground probability, 8-bit (255 = probability 1).")
@click.option("--skip-bad", is_flag=True,
              help="Go on past a file that cannot be read, and list the files skipped at the end.")
@config_option("--batch-size", type=int)
@config_option("--backend", type=BACKENDS)
def predict_cmd(backend, **opts):
    """Segment INPUT images: writes <name>_mask.png (0/255, at the image's own size) and <name>_overlay.png.

    INPUT is image files, folders of images, or data folders (COVID-QU-Ex, masks or not). Files that predict
    wrote (<name>_mask.png, _overlay.png, _prob.png in --out) are never read as inputs.

    \b
    Examples:
      minunet predict xray.png --out pred/
      minunet predict scans/ --out pred/ --keep-largest 2 --model runs/lung/best.npz
      minunet predict "Lung Segmentation Data/Test" --out pred/ --skip-bad --no-overlay --save-prob
      minunet predict scans/ --out lesions/ --mask infection

    \b
    On several processes (pip install 'minunet[mpi]'), each segments a share of the inputs:
      mpiexec -n 8 minunet predict archive/ --out pred/ --skip-bad
    """
    from minunet.distributed import world

    ranks = world()
    with ranks.command(backend):
        _predict(ranks, backend=backend, **opts)


def _predict(ranks, inputs, out, model_path, mask, threshold, min_area, view_shift, keep_largest, size, no_overlay,
             save_prob, skip_bad, batch_size, backend):
    """predict_cmd on this rank: the checks on every rank (``agree``), then its share of whole batches of the
    inputs (``batch_range``); the skipped files are gathered for rank 0's closing lines."""
    import numpy as np
    from PIL import Image

    from minunet.cli.errors import CliError
    from minunet.errors import DataError, MinunetError
    from minunet.inference import probabilities, to_8bit
    from minunet.model import check_size
    from minunet.postprocess import drop_small, overlay
    from minunet.postprocess import keep_largest as keep_k

    def setup():
        if keep_largest < 0 or batch_size < 1:
            raise CliError("--keep-largest must be >= 0 and --batch-size >= 1")
        check_postprocess(threshold, min_area)
        files = collect_inputs(inputs, Path(out).expanduser())
        model, ck, note = load_model(model_path or shipped_model(mask), backend.lower())
        return files, model, ck, note

    files, model, ck, note = ranks.agree(setup, catch=(MinunetError, click.ClickException))
    ranks.check_same("\n".join(map(str, files)).encode(), "input files")
    out = Path(out).expanduser()
    if note and ranks.is_root:
        click.echo(f"note: {note}", err=True)
    size = size or ck.input_size
    threshold, min_area = postprocess_of(ck, threshold, min_area)

    def check_inference():
        check_size(size, model.depth)
        return view_shift_of(ck, view_shift, size)

    view_shift = ranks.agree(check_inference)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files)
    lo, hi = ranks.batch_range(len(files), batch_size)
    skipped = []
    bar = Bar()
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        read = read_images(zip(files[start:stop], names[start:stop]), skip_bad, skipped)
        grays = [g for _, g in read]
        for (name, g), p in zip(read, probabilities(model, grays, size, batch_size, view_shift),
                               strict=True):
            m = keep_k(drop_small(p > threshold, min_area), keep_largest)
            Image.fromarray((m * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
            if not no_overlay:
                Image.fromarray(overlay(g, m)).save(out / f"{name}_overlay.png")
            if save_prob:
                Image.fromarray(to_8bit(p)).save(out / f"{name}_prob.png")
        if ranks.is_root:
            bar.update("predicting", stop - lo, hi - lo)
    bar.clear()
    skipped = [s for part in ranks.all_gather(skipped) for s in part]

    def check_any_read():
        if len(skipped) == len(files):
            raise DataError(f"none of the {len(files)} input file(s) could be read, e.g. {skipped[0][1]}")

    ranks.agree(check_any_read)
    if not ranks.is_root:
        return
    report_skipped(skipped)
    wrote = ["mask(s)"] + ([] if no_overlay else ["overlay(s)"]) + (["probability map(s)"] if save_prob else [])
    click.echo(f"wrote {len(files) - len(skipped)} {', '.join(wrote)} to {out}"
               + (f"; skipped {len(skipped)} unreadable file(s), listed above" if skipped else ""))
