"""``minunet evaluate``: Dice and IoU of a checkpoint on a data folder."""

from __future__ import annotations

import json

import click

from minunet.cli.common import BACKENDS, DEFAULT_MODEL, MASKS, Bar, load_model


def choose_split(index, split):
    """The items to score: --split, or by default test (when it has masks), else val, else all."""
    from minunet.errors import DataError

    def with_masks(items):
        return bool(items) and all(it.mask is not None for it in items)

    if split is None:
        for s in ("test", "val"):
            if s in index.splits and with_masks(index.splits[s]):
                split = s
                break
        else:
            split = "all"
    items = index.items(split)
    for it in items:
        if it.mask is None:
            raise DataError(f"image {it.image} has no {index.mask} mask, so it cannot be scored: "
                            "add the mask, remove the image, or pick another --split")
    return split, items


def filter_items(items, only):
    """The items named in ``only``: a text list of names or a run's split.json (its val list)."""
    import json
    from pathlib import Path

    from minunet.data import _excluded, read_name_list
    from minunet.errors import DataError

    path = Path(only)
    if path.suffix == ".json":
        try:
            names = set(json.loads(path.read_text())["val"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{path} is not a run's split.json with a val list: pass one, or a text list") from None
    else:
        names = read_name_list(path)
    kept = [it for it in items if _excluded(it, names)]
    if not kept:  # DATA points below the run's data root: match the tails of the listed names
        tails = {"/".join(n.split("/")[i:]) for n in names for i in range(len(n.split("/")))}
        kept = [it for it in items if _excluded(it, tails)]
    if not kept:
        raise DataError(f"none of the images in {path} are in this data folder: check DATA and --only")
    return kept


@click.command("evaluate")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--model", "model_path", type=click.Path(path_type=str), default=str(DEFAULT_MODEL),
              show_default="the shipped lung model", help="Checkpoint (.npz) written by 'minunet train'.")
@click.option("--mask", type=MASKS, default="lung", show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default=None,
              help="[default: test if it has masks, else val, else all]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--size", type=int, default=None, help="Resize to SIZE [default: the size the model was trained at].")
@click.option("--threshold", type=float, default=0.5, show_default=True)
@click.option("--keep-largest", type=int, default=0, show_default=True,
              help="Keep only the K largest connected components of each prediction (0: all).")
@click.option("--only", type=click.Path(path_type=str), default=None,
              help="Score only the images listed: a text file of names, or a run's split.json (its val list).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
@click.option("--base-channels", type=int, default=None, help="Check the checkpoint has this width.")
@click.option("--depth", type=int, default=None, help="Check the checkpoint has this depth.")
@click.option("--cache-dir", type=click.Path(path_type=str), default=None)
def evaluate_cmd(data, model_path, mask, split, as_json, size, threshold, keep_largest, only, batch_size, backend,
                 base_channels, depth, cache_dir):
    """Score a model on DATA: mean per-image Dice and IoU, pooled Dice, per class.

    \b
    Examples:
      minunet evaluate "Infection Segmentation Data" --split test
      minunet evaluate data/ --model runs/lung/best.npz --json
      minunet evaluate DATA --model runs/lung/best.npz --only runs/lung/split.json
    """
    from minunet.cli.errors import CliError
    from minunet.data import default_cache_dir, find_data, load_arrays
    from minunet.train import check_size, evaluate_model

    if batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 < threshold < 1:
        raise CliError(f"--threshold must be between 0 and 1, got {threshold}")
    index = find_data(data, mask.lower(), require_masks=False)
    split, items = choose_split(index, "all" if only and split is None else split)
    if only:
        items = filter_items(items, only)
        split += f" (only {only})"
    model, ck, note = load_model(model_path, backend.lower(), base_channels, depth)
    size = size or int(ck.meta.get("train_config", {}).get("size", 256))
    check_size(size, model.depth)
    bar = Bar()
    arrays = load_arrays(items, size, default_cache_dir() if cache_dir is None else cache_dir or None,
                         progress=lambda d, t: bar.update("decoding", d, t))
    bar.clear()
    ev = evaluate_model(model, arrays, batch_size, threshold,
                        progress=lambda _e, done, total: bar.update("evaluating", done, total),
                        keep_largest_k=keep_largest)
    bar.clear()
    s = ev.summary
    if as_json:
        out = ev.to_json()
        out.update(split=split, data=str(index.root), mask=index.mask, model=str(ck.path), size=size,
                   threshold=threshold, keep_largest=keep_largest, masks=arrays.mask_stats.describe())
        click.echo(json.dumps(out))
        return
    if note:
        click.echo(f"note: {note}", err=True)
    cfg = ck.model_config
    click.echo(f"model: {ck.path} (base {cfg['base_channels']}, depth {cfg['depth']}), size {size}, "
               f"threshold {threshold}" + (f", keep largest {keep_largest}" if keep_largest else ""))
    click.echo(f"data:  {index.root} [{index.layout}], split {split}: {s['n_images']} images, {index.mask} "
               f"{arrays.mask_stats.describe()}")
    click.echo(f"Dice (mean per image)  {s['dice']:.4f}")
    click.echo(f"IoU  (mean per image)  {s['iou']:.4f}")
    click.echo(f"Dice (pooled)          {s['dice_pooled']:.4f}")
    click.echo(f"IoU  (pooled)          {s['iou_pooled']:.4f}")
    click.echo(f"empty masks            {s['n_empty_masks']}")
    if len(ev.per_group) > 1 or "all" not in ev.per_group:
        click.echo(f"{'class':<12} {'images':>6} {'Dice':>7} {'IoU':>7} {'pooled':>7} {'empty':>6}")
        for g, gs in ev.per_group.items():
            click.echo(f"{g:<12} {gs['n_images']:>6} {gs['dice']:>7.4f} {gs['iou']:>7.4f} "
                       f"{gs['dice_pooled']:>7.4f} {gs['n_empty_masks']:>6}")
