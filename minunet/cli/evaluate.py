"""``minunet evaluate``: Dice and IoU of a checkpoint on a data folder."""

from __future__ import annotations

import click

from minunet.cli.common import (
    BACKENDS,
    MASKS,
    VIEW_SHIFT_HELP,
    Bar,
    check_postprocess,
    config_option,
    load_model,
    postprocess_of,
    shipped_model,
    strict_json,
    view_shift_of,
)
from minunet.evaluation import THRESHOLD


def choose_split(index, split):
    """The items to score: --split, or by default test (when it has masks), else val, else all; but train
    when other splits lack masks (a Test split as COVID-QU-Ex ships it, images only, is for predict)."""
    from minunet.errors import DataError

    def with_masks(items):
        return bool(items) and all(it.mask is not None for it in items)

    if split is None:
        for s in ("test", "val"):
            if s in index.splits and with_masks(index.splits[s]):
                split = s
                break
        else:
            use_all = with_masks(index.items("all")) or not with_masks(index.splits.get("train"))
            split = "all" if use_all else "train"
    items = index.items(split)
    for it in items:
        if it.mask is None:
            raise DataError(f"image {it.image} has no {index.mask} mask, so it cannot be scored: "
                            "add the mask, remove the image, or pick another --split")
    return split, items


def trained_on(items, split: dict) -> list:
    """The ``items`` that a model trained on ``split`` (the file lists its checkpoint records) saw in training.

    An item matches a training name when one path ends with the other (DATA may sit above or below the
    training data root) or, for COVID-QU-Ex, by class and file name (a copy in another folder)."""
    names = split.get("train") or []
    tails = {"/".join(n.split("/")[i:]) for n in names for i in range(len(n.split("/")))}
    by_class = set()
    if split.get("layout") == "covid-qu-ex":
        by_class = {(p[-3], p[-1]) for p in (n.split("/") for n in names) if len(p) >= 3}
    full = set(names)

    def seen(it):
        parts = it.name.split("/")
        return (it.name in tails or any("/".join(parts[i:]) in full for i in range(len(parts)))
                or (it.group, parts[-1]) in by_class)

    return [it for it in items if seen(it)]


def write_per_image(path, rows):
    """The per-image scores as CSV (evaluation.PER_IMAGE_COLUMNS), Dice and IoU to 6 decimals."""
    import csv
    from pathlib import Path

    from minunet.evaluation import PER_IMAGE_COLUMNS

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=PER_IMAGE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "dice": f"{r['dice']:.6f}", "iou": f"{r['iou']:.6f}"})


def probability_writer(folder, names):
    """``evaluate_model``'s ``each_probability``: writes image i's map as <name>_prob.png (8-bit, 255 =
    probability 1) into ``folder``, named after ``names[i]`` (a relative path)."""
    from pathlib import Path

    from PIL import Image

    from minunet.cli.common import unique_name
    from minunet.inference import to_8bit

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    used = set()
    stems = [unique_name(Path(n).stem, used) for n in names]
    return lambda i, prob: Image.fromarray(to_8bit(prob)).save(folder / f"{stems[i]}_prob.png")


@click.command("evaluate")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--model", "model_path", type=click.Path(path_type=str), default=None,
              show_default="the shipped model of --mask",
              help="Checkpoint (.npz) of 'minunet train', or a .safetensors of 'minunet export'.")
@config_option("--mask", type=MASKS)
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default=None,
              help="[default: test if it has masks, else val, else all]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--size", type=int, default=None, help="Resize to SIZE [default: the size the model was trained at].")
@click.option("--threshold", type=float, default=None, show_default=f"the model's, else {THRESHOLD}",
              help="Foreground where sigmoid(logit) > THRESHOLD.")
@click.option("--min-area", type=float, default=None, show_default="the model's, else 0",
              help="Drop predicted components smaller than this share of the image (e.g. 0.01).")
@click.option("--view-shift", type=int, default=None, show_default="the model's, else 0", help=VIEW_SHIFT_HELP)
@click.option("--keep-largest", type=int, default=0, show_default=True,
              help="Keep only the K largest connected components of each prediction (0: all).")
@click.option("--only", type=str, default=None,
              help="Score only the images listed: a text file of names, a run's split.json, or a split file "
                   "(covid-qu-ex: the committed split).")
@click.option("--subset", type=click.Choice(["train", "val", "test"]), default=None,
              help="Which list of the --only split file [default: test if it has one, else val].")
@config_option("--batch-size", type=int)
@config_option("--backend", type=BACKENDS)
@click.option("--base-channels", type=int, default=None, help="Check the checkpoint has this width.")
@click.option("--depth", type=int, default=None, help="Check the checkpoint has this depth.")
@click.option("--cache-dir", type=click.Path(path_type=str), default=None)
@click.option("--per-image", type=click.Path(path_type=str), default=None,
              help="Write each image's scores to this CSV: image, class, dice, iou, pred_px, ref_px.")
@click.option("--save-prob", type=click.Path(path_type=str), default=None,
              help="Write each image's probability map to this folder: <name>_prob.png, 8-bit (255 = probability "
                   "1), at the size it is scored at.")
def evaluate_cmd(backend, **opts):
    """Score a model on DATA: mean per-image Dice and IoU, pooled Dice, per class.

    \b
    Examples:
      minunet evaluate "Infection Segmentation Data" --split test
      minunet evaluate data/ --model runs/lung/best.npz --json
      minunet evaluate DATA --model runs/lung/best.npz --only runs/lung/split.json
      minunet evaluate "Infection Segmentation Data" --only covid-qu-ex --subset test
      minunet evaluate DATA --model runs/lung/best.npz --per-image scores.csv --save-prob prob/

    Warns when images it scores are in the model's training list (which every checkpoint records).

    \b
    On several processes (pip install 'minunet[mpi]'), each decodes and scores a share of the images;
    the scores are the same as one process's:
      mpiexec -n 8 minunet evaluate DATA --model runs/lung/best.npz --json
    """
    from minunet.distributed import world

    ranks = world()
    with ranks.command(backend):
        _evaluate(ranks, backend=backend, **opts)


def _evaluate(ranks, data, model_path, mask, split, as_json, size, threshold, min_area, view_shift, keep_largest, only,
              subset, batch_size, backend, base_channels, depth, cache_dir, per_image, save_prob):
    """evaluate_cmd on this rank: the checks on every rank (``agree``: an error they all meet is printed once),
    then this rank's share of the batches (``batch_range``), decoded and scored; the results are merged in rank
    order and rank 0 reports them."""
    from minunet.checkpoint import path_name
    from minunet.cli.errors import CliError
    from minunet.data import default_cache_dir, filter_items, find_data, load_arrays
    from minunet.distributed import merge_mask_stats
    from minunet.errors import MinunetError
    from minunet.evaluation import evaluate_model
    from minunet.model import check_size

    def setup():
        if batch_size < 1:
            raise CliError(f"--batch-size must be >= 1, got {batch_size}")
        if keep_largest < 0:
            raise CliError(f"--keep-largest must be >= 0 (0 keeps every component), got {keep_largest}")
        check_postprocess(threshold, min_area)
        index = find_data(data, mask.lower(), require_masks=False)
        chosen, items = choose_split(index, "all" if only and split is None else split)
        if only:
            items, label = filter_items(items, only, subset)
            chosen += f" (only the {label})"
        elif subset:
            raise CliError("--subset chooses a list of the --only split file: give --only too")
        model, ck, note = load_model(model_path or shipped_model(mask), backend.lower(), base_channels, depth)
        check_size(size or ck.input_size, model.depth)
        view_shift_of(ck, view_shift, size or ck.input_size)
        return index, chosen, items, model, ck, note

    index, split, items, model, ck, note = ranks.agree(setup, catch=(MinunetError, click.ClickException))
    ranks.check_same("\n".join(it.name for it in items).encode(), "images to score")
    size = size or ck.input_size
    threshold, min_area = postprocess_of(ck, threshold, min_area)
    view_shift = view_shift_of(ck, view_shift, size)
    lo, hi = ranks.batch_range(len(items), batch_size)
    bar = Bar()
    decoding = evaluating = None  # progress: rank 0 shows its share's
    if ranks.is_root:
        def decoding(done, total):
            bar.update("decoding", done, total)

        def evaluating(_event, done, total):
            bar.update("evaluating", done, total)

    arrays = load_arrays(items[lo:hi], size, default_cache_dir() if cache_dir is None else cache_dir or None,
                         progress=decoding)
    bar.clear()
    each_probability = None
    if save_prob:  # named from every image of the set, so that two ranks never pick the same name
        write = probability_writer(save_prob, [it.name for it in items])

        def each_probability(i, prob):
            write(lo + i, prob)

    ev = evaluate_model(model, arrays, batch_size, threshold, progress=evaluating, keep_largest_k=keep_largest,
                        min_area=min_area, each_probability=each_probability, view_shift=view_shift)
    bar.clear()
    ev = ranks.merged(ev)
    mask_stats = ranks.gather(arrays.mask_stats)
    if not ranks.is_root:
        return
    mask_stats = merge_mask_stats(mask_stats)
    if per_image:
        write_per_image(per_image, ev.per_image_rows())
    n_seen = None if "split" not in ck.meta else len(trained_on(items, ck.meta["split"]))
    if n_seen:
        trained_data = path_name(ck.meta.get("train_config", {}).get("data", "")) or "its data"
        click.echo(f"warning: {n_seen} of the {len(items)} images scored were in this model's training set "
                   f"({trained_data}; matched by name): these scores overstate how it does on new images; "
                   "score held-out images (--split test, or --only RUN/split.json)", err=True)
    s = ev.summary
    if as_json:
        out = ev.to_json()
        out.update(split=split, data=str(index.root), mask=index.mask, model=str(ck.path), size=size,
                   threshold=threshold, min_area=min_area, view_shift=view_shift, keep_largest=keep_largest,
                   masks=mask_stats.describe(), n_trained_on=n_seen)
        click.echo(strict_json(out))
        return
    if note:
        click.echo(f"note: {note}", err=True)
    cfg = ck.model_config
    click.echo(f"model: {ck.path} (base {cfg['base_channels']}, depth {cfg['depth']}), size {size}, "
               f"threshold {threshold}" + (f", min area {min_area}" if min_area else "")
               + (f", shifted views {view_shift} px" if view_shift else "")
               + (f", keep largest {keep_largest}" if keep_largest else ""))
    click.echo(f"data:  {index.root} [{index.layout}], split {split}: {s['n_images']} images, {index.mask} "
               f"{mask_stats.describe()}")
    click.echo(f"Dice (mean per image)  {s['dice']:.4f}")
    click.echo(f"IoU  (mean per image)  {s['iou']:.4f}")
    click.echo(f"Dice (pooled)          {s['dice_pooled']:.4f}")
    click.echo(f"IoU  (pooled)          {s['iou_pooled']:.4f}")
    click.echo(f"empty masks            {s['n_empty_masks']}")
    if index.mask == "infection":
        click.echo(f"Dice (non-empty masks) {_fmt(s['dice_nonempty'])}   over {s['n_nonempty']} images")
        click.echo(f"FP image rate          {_fmt(s['fp_image_rate'])}   images with an empty mask and a "
                   "predicted lesion")
    if len(ev.per_group) > 1 or "all" not in ev.per_group:
        extra = f" {'Dice-ne':>7} {'FP-img':>7}" if index.mask == "infection" else ""
        click.echo(f"{'class':<12} {'images':>6} {'Dice':>7} {'IoU':>7} {'pooled':>7} {'empty':>6}{extra}")
        for g, gs in ev.per_group.items():
            extra = f" {_fmt(gs['dice_nonempty'])} {_fmt(gs['fp_image_rate'])}" if index.mask == "infection" else ""
            click.echo(f"{g:<12} {gs['n_images']:>6} {gs['dice']:>7.4f} {gs['iou']:>7.4f} "
                       f"{gs['dice_pooled']:>7.4f} {gs['n_empty_masks']:>6}{extra}")


def _fmt(v):
    return f"{'-':>7}" if v is None else f"{v:>7.4f}"
