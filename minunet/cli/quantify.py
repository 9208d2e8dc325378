"""``minunet quantify``: how much of each lung is affected, per X-ray, from the lung and the lesion model."""

from __future__ import annotations

from pathlib import Path

import click

from minunet.cli.common import (
    BACKENDS,
    DEFAULT_INFECTION_MODEL,
    DEFAULT_MODEL,
    VIEW_SHIFT_HELP,
    Bar,
    check_postprocess,
    config_option,
    load_model,
    postprocess_of,
    strict_json,
    view_shift_of,
)


def collect_cases(inputs, only=None, subset=None, out=None):
    """[(image path, reference lung mask or None, reference lesion mask or None)] from INPUT arguments.

    A COVID-QU-Ex folder gives every image with its 'lung masks' and 'infection masks' twins, when it has
    them (``only``/``subset`` pick a list of a split file, as for evaluate); files and plain folders
    give images without references. What predict or quantify wrote to ``out`` is never an input."""
    from minunet.cli.predict import collect_inputs, is_own_output
    from minunet.data import filter_items, find_data, subdir
    from minunet.errors import DataError

    out = None if out is None else Path(out).expanduser()
    cases = []
    for arg in inputs:
        p = Path(arg).expanduser()
        index = None
        if p.is_dir():
            try:
                index = find_data(p, "infection", require_masks=False)
            except DataError:
                index = None
        if index is None or index.layout != "covid-qu-ex":
            if only:
                raise DataError(f"--only needs a COVID-QU-Ex folder, but {p} is not one: drop --only")
            cases += [(f, None, None) for f in collect_inputs([arg], out)]
            continue
        items = [it for it in index.items("all") if not is_own_output(it.image, out)]
        if only:
            items, _ = filter_items(items, only, subset)
        for it in items:
            lung_dir = subdir(it.image.parent.parent, "lung masks")
            lung = lung_dir / it.image.name if lung_dir is not None else None
            cases.append((it.image, lung if lung is not None and lung.is_file() else None, it.mask))
    return cases


def _csv_value(v):
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else v


@click.command("quantify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", type=click.Path(path_type=str), required=True,
              help="Folder for quantify.csv, summary.json and one <name>_quantify.png per image.")
@click.option("--lung-model", type=click.Path(path_type=str), default=str(DEFAULT_MODEL),
              show_default="the shipped lung model")
@click.option("--infection-model", type=click.Path(path_type=str), default=str(DEFAULT_INFECTION_MODEL),
              show_default="the shipped infection model")
@click.option("--threshold", type=float, default=None, show_default="each model's, else 0.5",
              help="Probability threshold of both models.")
@click.option("--min-area", type=float, default=None, show_default="the lesion model's, else 0",
              help="Drop lesions smaller than this share of the image.")
@click.option("--view-shift", type=int, default=None, show_default="each model's, else 0",
              help="Shifted views of both models: " + VIEW_SHIFT_HELP)
@click.option("--only", type=str, default=None,
              help="With a COVID-QU-Ex folder: only the images of a split file (e.g. covid-qu-ex) or name list.")
@click.option("--subset", type=click.Choice(["train", "val", "test"]), default=None,
              help="Which list of the --only split file [default: test if it has one, else val].")
@config_option("--batch-size", type=int)
@config_option("--backend", type=BACKENDS)
def quantify_cmd(backend, **opts):
    """How much of each lung the lesions cover: a CSV row and a picture per X-ray.

    Runs the lung model and the lesion (infection) model on each image and counts
    lesion pixels inside the predicted lung. The patient's right lung is on the
    image's left (frontal view). severity_score (0-8) is a mask-derived extent
    score after Wong et al. 2020, not a radiologist's reading. Research and
    teaching only: not for diagnosis. With a COVID-QU-Ex folder the reference
    masks are scored the same way and summary.json gets an agreement object.

    \b
    Examples:
      minunet quantify xray.png --out quant/
      minunet quantify "Infection Segmentation Data" --only covid-qu-ex --subset test --out quant/

    \b
    On several processes (pip install 'minunet[mpi]'), each quantifies a share of the X-rays:
      mpiexec -n 8 minunet quantify archive/ --out quant/
    """
    from minunet.distributed import world

    ranks = world()
    with ranks.command(backend):
        _quantify(ranks, backend=backend, **opts)


def _quantify(ranks, inputs, out, lung_model, infection_model, threshold, min_area, view_shift, only, subset,
              batch_size, backend):
    """quantify_cmd on this rank: the checks on every rank (``agree``), then its share of whole batches of the
    X-rays (``batch_range``); rank 0 gathers the rows and reference figures in input order and writes
    quantify.csv and summary.json."""
    import csv
    from functools import partial

    from PIL import Image

    from minunet.cli.errors import CliError
    from minunet.cli.predict import output_names
    from minunet.data import binarise_mask, read_gray, read_mask
    from minunet.errors import MinunetError
    from minunet.inference import probabilities
    from minunet.postprocess import drop_small
    from minunet.quantify import COLUMNS, lung_damage, picture, summarise

    catch = (MinunetError, click.ClickException)

    def find_cases():
        check_postprocess(threshold, min_area)
        if batch_size < 1:
            raise CliError(f"--batch-size must be >= 1, got {batch_size}")
        if subset and not only:
            raise CliError("--subset chooses a list of the --only split file: give --only too")
        return collect_cases(inputs, only, subset, out)

    cases = ranks.agree(find_cases, catch)
    ranks.check_same("\n".join(str(c) for c in cases).encode(), "inputs")
    models = []  # (model, input size, threshold, min_area, view shift): the lung model, then the lesion model
    for path, option, area in ((lung_model, "--lung-model", 0.0), (infection_model, "--infection-model", min_area)):
        model, ck, note = ranks.agree(partial(load_model, path, backend.lower(), option=option), catch)
        if note and not models and ranks.is_root:
            click.echo(f"note: {note}", err=True)
        t, a = postprocess_of(ck, threshold, area)
        shift = ranks.agree(partial(view_shift_of, ck, view_shift, ck.input_size), catch)
        models.append((model, ck.input_size, t, a, shift))
    has_refs = any(lung is not None and inf is not None for _, lung, inf in cases)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names([f for f, _, _ in cases])
    lo, hi = ranks.batch_range(len(cases), batch_size)
    rows, refs, no_lung = [], [], []
    bar = Bar()
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        chunk = cases[start:stop]
        grays = [read_gray(f) for f, _, _ in chunk]
        lung_p, inf_p = ([drop_small(p > t, a) for p in probabilities(m, grays, size, batch_size, shift)]
                         for m, size, t, a, shift in models)
        for (f, ref_lung, ref_inf), name, g, lung, inf in zip(chunk, names[start:stop], grays, lung_p, inf_p,
                                                               strict=True):
            d = lung_damage(lung, inf)
            if d.lung_px == 0:
                no_lung.append(str(f))
            row = {"image": str(f), **d.as_dict()}
            ref = None
            if ref_lung is not None and ref_inf is not None:
                ref = lung_damage(*(binarise_mask(read_mask(m)[0], source=str(m))[0] for m in (ref_lung, ref_inf)))
                row.update(ref_infected_percent=ref.infected_percent, ref_severity_score=ref.severity_score)
                ref = ref.as_dict()
            rows.append(row)
            refs.append(ref)
            Image.fromarray(picture(g, lung, inf, d)).save(out / f"{name}_quantify.png")
        if ranks.is_root:
            bar.update("quantifying", stop - lo, hi - lo)
    bar.clear()
    parts = ranks.gather((rows, refs, no_lung))  # in rank order: the inputs' order
    if not ranks.is_root:
        return
    rows, refs, no_lung = ([x for part in parts for x in part[j]] for j in range(3))
    fields = ["image", *COLUMNS] + (["ref_infected_percent", "ref_severity_score"] if has_refs else [])
    with open(out / "quantify.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})
    summary = summarise(rows, refs if has_refs else None)
    (out / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    if no_lung:
        click.echo(f"warning: no lung found in {len(no_lung)} image(s) (empty cells in the CSV), e.g. {no_lung[0]}",
                   err=True)
    mean = summary["mean_infected_percent"]
    click.echo(f"quantified {len(rows)} image(s): mean infected share {'-' if mean is None else f'{mean:.1f}%'}; "
               f"severity histogram (0-8) {summary['severity_histogram']}")
    if "agreement" in summary:
        a = summary["agreement"]
        if a["n"]:
            click.echo(f"agreement with the reference masks over {a['n']} image(s) with lesions: mean abs error "
                       f"{a['mae_infected_percent']:.1f} points, severity exact {a['severity_exact']:.2f}, "
                       f"within 1 {a['severity_within_1']:.2f}")
    click.echo(f"wrote {out / 'quantify.csv'}, {out / 'summary.json'} and the pictures (not for diagnosis)")
