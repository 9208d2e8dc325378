"""``minunet train``: train a U-Net, with a progress bar and one line per epoch."""

from __future__ import annotations

import dataclasses
import signal

import click
from click.core import ParameterSource

from minunet.cli.common import BACKENDS, MASKS, SAMPLE_DATA, Bar, config_option
from minunet.cli.errors import EXIT_BAD_INPUT, CliError
from minunet.distributed import world
from minunet.errors import MinunetError
from minunet.losses import LOSSES
from minunet.runfolder import load_run_config
from minunet.train import LR_SCHEDULES, TrainConfig, train


def _fmt(v, width, digits):
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


class TrainReporter:
    """Renders train()'s progress events: a bar while an epoch runs, a table row after it."""

    def __init__(self, mask="lung"):
        self.bar = Bar()
        self.header_done = False
        self.infection = mask == "infection"  # then also dice_nonempty and fp_image_rate per epoch

    def __call__(self, event, **i):
        echo = click.echo
        if event == "note":
            self.bar.clear()
            echo(f"note: {i['message']}", err=True)
        elif event == "backend":
            if i.get("note"):
                echo(f"note: {i['note']}", err=True)
            echo(f"backend: {i['name']}")
        elif event == "decode":
            self.bar.update(f"decoding {i['what']}", i["done"], i["total"])
            if i["done"] == i["total"]:
                self.bar.clear()
        elif event == "data":
            echo(f"data: {i['describe']}")
            ex = f", {i['excluded']} excluded" if i["excluded"] else ""
            echo(f"      train {i['n_train']}, val {i['n_val']} ({i['val_source']}{ex}); {i['masks']}"
                 + ("; from cache" if i["cached"] else ""))
        elif event == "epoch_start":
            if not self.header_done:
                extra = f"{'Dice-ne':>8}  {'FP-img':>6}  " if self.infection else ""
                echo(f"{'epoch':>5}  {'train loss':>10}  {'val loss':>8}  {'val Dice':>8}  {'val IoU':>8}  {extra}"
                     f"{'seconds':>8}  {'img/s':>6}")
                self.header_done = True
            self.epoch, self.epochs = i["epoch"], i["epochs"]
        elif event == "batch":
            # a callable: the loss (on a GPU, a device value; reading it waits for the GPU) is read only
            # when the bar draws a line, at most ten times a second
            self.bar.update(f"epoch {i['epoch']}/{self.epochs}", i["batch"], i["n_batches"],
                            lambda: f"loss {float(i['loss']):.4f}  {i['images_per_s']:.1f} img/s")
        elif event == "validate":
            self.bar.update(f"validating {self.epoch}/{self.epochs}", i["done"], i["total"])
        elif event == "epoch_end":
            self.bar.clear()
            r = i["row"]
            extra = (f"{_fmt(r['val_dice_nonempty'], 8, 4)}  {_fmt(r['val_fp_image_rate'], 6, 3)}  "
                     if self.infection else "")
            echo(f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {r['val_loss']:>8.4f}  {r['val_dice']:>8.4f}  "
                 f"{r['val_iou']:>8.4f}  {extra}{r['seconds']:>8.1f}  {r['images_per_s']:>6.1f}"
                 + ("  *" if i["best"] else ""))
        elif event == "interrupt_requested":
            self.bar.clear()
            how = "Ctrl-C" if i["signal"] == "SIGINT" else i["signal"]
            echo(f"{how}: stopping after this step, saving last.npz ({how} again to stop at once)...", err=True)
        elif event in ("interrupted", "nonfinite", "diverged"):
            self.bar.clear()
            echo(i["message"], err=True)
        elif event == "done":
            self.bar.clear()


@click.command("train")
@click.argument("data", required=False, type=click.Path(path_type=str))
@config_option("--mask", type=MASKS, help="Which masks to learn.")
@config_option("--epochs", type=int)
@config_option("--batch-size", type=int)
@config_option("--lr", type=float, help="Adam learning rate.")
@config_option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="cosine: from lr down to 0 over all epochs.")
@config_option("--loss", type=click.Choice(LOSSES),
               help="bce+dice adds the soft Dice per image; bce+dice+image also an image-level has-lesion term.")
@config_option("--base-channels", type=int)
@config_option("--depth", type=int)
@config_option("--size", type=int, help="Images are resized to SIZE x SIZE.")
@config_option("--backend", type=BACKENDS)
@config_option("--seed", type=int)
@config_option("--val-fraction", type=float, help="Held-out share per class when the data has no Val split.")
@config_option("--limit", type=int, help="Use only N images (a seeded pick), for quick runs.")
@config_option("--augment/--no-augment", help="Seeded small rotations, shifts and intensity changes.")
@config_option("--whiten-lesions", type=click.FloatRange(0, 1), metavar="P",
               help="Lung runs with --augment: with probability P, brighten each image's infected region (from "
                    "the data's infection masks) towards soft-tissue white, so the model learns that consolidated "
                    "lung is still lung.")
@config_option("--severe-repeat", type=click.IntRange(min=1), metavar="N",
               help="Lung runs on data with infection masks: images whose lesions cover half the lung or more "
                    "go N times through each epoch (the sickest lungs are the hardest to outline).")
@config_option("--lesion-weight", type=click.FloatRange(min=1), metavar="W",
               help="Lung runs on data with infection masks: the BCE term weighs the pixels inside the infection "
                    "mask W times (moved with the augmentation), so missing consolidated lung costs more.")
@config_option("--exclude", type=click.Path(path_type=str),
               help="Images to keep out: a text file of names (e.g. minunet/assets/sample/FILES.txt), or a split "
                    "file (a run's split.json, covid-qu-ex) whose held-out val and test lists are kept out.")
@config_option("--split-file", type=str,
               help="Train on the train list and validate on the val list of this split file: covid-qu-ex "
                    "(the committed COVID-QU-Ex split) or a JSON file such as a run's split.json.")
@config_option("--init", type=click.Path(path_type=str),
               help="Start from these weights (a checkpoint of the same width and depth), e.g. a lung model.")
@config_option("--threads", type=click.IntRange(min=1),
               help="Compute threads of each process [default: the cores, shared by the processes mpiexec starts "
                    "on the machine].")
@config_option("--cache-dir", type=click.Path(path_type=str),
               help="Where decoded images are cached [default: $MINUNET_CACHE or ~/.cache/minunet].")
@click.option("--no-cache", is_flag=True, help="Decode every time; write no cache.")
@click.option("--out", type=click.Path(path_type=str), default="runs/train", show_default=True,
              help="Run folder: config.json, history.csv, curves.png, last.npz, best.npz.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out where it stopped (with the same settings; --lr may change).")
@click.option("--force", is_flag=True, help="Start over in an --out that already holds a run.")
@click.pass_context
def train_cmd(ctx, data, **opts):
    """Train a U-Net on DATA (default: the 150-image sample shipped with minunet).

    \b
    Examples:
      minunet train --out runs/sample
      minunet train "Infection Segmentation Data" --mask lung --epochs 5 --out runs/lung
      minunet train --resume --out runs/lung
      minunet train --resume --out runs/lung --lr 0.0001   after a diverged run (recorded in config.json)

    \b
    Ctrl-C or SIGTERM (a scheduler, docker stop, timeout) saves a resumable last.npz
    and exits with 130 or 143. One training at a time writes in --out (a .lock file).

    \b
    On several processes (pip install 'minunet[mpi]'): each takes a share of every batch,
    the gradients are summed, and the run is bitwise repeatable for the same number of them:
      mpiexec -n 4 minunet train DATA --out runs/lung
      mpiexec -n 8 -f hosts minunet train DATA --out runs/lung      8 processes on the machines in 'hosts'
    """
    ranks = world()
    try:
        _train(ctx, data, ranks, **opts)
    except MinunetError as e:
        if getattr(e, "on_every_rank", False) and not ranks.is_root:
            ctx.exit(EXIT_BAD_INPUT)  # rank 0 prints it
        raise


def _train(ctx, data, ranks, **opts):
    resume, force, no_cache = opts.pop("resume"), opts.pop("force"), opts.pop("no_cache")
    if no_cache:
        opts["cache_dir"] = ""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in opts.items() if k in fields}
    if resume:  # the run folder is rank 0's (the other ranks may run on machines that do not see it)
        saved = ranks.from_root(lambda: load_run_config(opts["out"]))
        for k in fields - {"out", "threads"}:  # the threads are the machine's, not the run's
            given = k in values and ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
            if not given and k in saved and k != "data":
                values[k] = saved[k]
        data = data or saved.get("data")
    data = data or str(SAMPLE_DATA)
    values["mask"] = values["mask"].lower()
    values["backend"] = values["backend"].lower()
    cfg = TrainConfig(data=data, **values)
    result = train(cfg, TrainReporter(cfg.mask), resume=resume, force=force)
    if result.status == "interrupted":
        ctx.exit(128 + signal.Signals[result.stopped_by])  # the shell's status for that signal: 130, 143
    if result.status in ("nonfinite", "diverged"):
        if not ranks.is_root:
            ctx.exit(EXIT_BAD_INPUT)  # rank 0 prints it
        raise CliError(result.message)
    if not ranks.is_root:
        return
    what = "score (dice_nonempty x (1 - fp_image_rate))" if cfg.mask == "infection" else "Dice"
    click.echo(f"best val {what} {result.best_dice:.4f} at epoch {result.best_epoch}; run folder {result.out}")
