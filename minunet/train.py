"""The training loop: epochs, validation, checkpoints, resume, Ctrl-C and SIGTERM.

``train(config, progress)`` runs a whole training and writes the run folder
``config.out`` (runfolder.py lists its files). ``TrainConfig`` holds every
setting and its default; the ``minunet train`` options take their defaults from it.

Determinism: epoch e visits the images in ``data.epoch_order(n, seed, e)`` and
batch b is augmented from ``default_rng([seed, e, b])``. A checkpoint records
(epoch, batches done, optimizer step, the epoch's running loss), so a resumed
run rebuilds exactly the batches still to do and ends with the same weights,
bit for bit, as an uninterrupted run on the same backend (so ``--resume``
refuses another one; ``auto`` is compared by the backend it resolved to).

``--resume --lr X`` is the one exception to "the same settings": it continues a run
(after a diverged one, say) with another learning rate, and records where
(``changes`` in config.json and in the checkpoint): from there the run is no
longer bitwise comparable with one that kept the old rate.

The operating system: Ctrl-C (SIGINT) and SIGTERM (schedulers, ``docker stop``,
``timeout``) finish the current step, save a resumable last.npz and stop (a
second signal stops at once); the run folder is locked while a training writes
in it (``runfolder.lock_run_folder``); temporaries of killed writers are removed
when the next training starts (``atomicfile``); a file that cannot be written (a
full disk, a read-only folder) stops the run with an ``OutputError`` that says
which checkpoint is kept. A model too large for the memory is refused before
anything is allocated (``footprint.check_training_memory``).

Several processes (``mpiexec -n 4 minunet train ...``, distributed.py): each rank computes the
gradient of its contiguous share of every batch (``batch_gradient``), the gradients are summed in
rank order, and every rank takes the same Adam step; validation batches are shared out too. Rank 0
alone locks and writes the run folder and reports progress. A stop (a signal, a non-finite loss) is
decided by all ranks together, so every rank stops after the same step. A run resumed on another
number of ranks records it under "changes" (no longer bitwise comparable from there).

Nothing here prints: every event goes to ``progress(event, **info)``, which the
CLI renders (events: note, backend, data, decode, epoch_start, batch, validate,
epoch_end, interrupt_requested, interrupted, nonfinite, diverged, done).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minunet import __version__
from minunet.atomicfile import remove_stale_temporaries
from minunet.charts import draw_curves
from minunet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from minunet.data import (
    MASK_KINDS,
    Augment,
    BatchLoader,
    default_cache_dir,
    find_data,
    load_arrays,
    make_split,
    num_batches,
    read_exclude,
    repeat_severe,
    split_from_file,
)
from minunet.data.split_files import NAMED as NAMED_SPLITS
from minunet.distributed import limit_threads, world
from minunet.errors import ConfigError, DataError, MinunetError, OutputError
from minunet.footprint import check_training_memory
from minunet.interrupt import InterruptGuard
from minunet.kernels import open_backend
from minunet.losses import LOSSES, loss_and_grad
from minunet.metrics import selection_score
from minunet.model import UNet, check_size
from minunet.optim import Adam, cosine_lr
from minunet.runfolder import (
    check_resumable,
    load_run_info,
    load_run_split,
    lock_run_folder,
    write_history,
    write_run_info,
)

# Settings that fix the sequence of updates: a resumed run must use the same ones, except those
# that --resume may change (recorded under "changes": the run stops being bitwise comparable there).
DETERMINISTIC_KEYS = (
    "data", "mask", "batch_size", "lr", "lr_schedule", "loss", "base_channels", "depth", "size",
    "seed", "val_fraction", "limit", "augment", "exclude", "split_file", "init", "whiten_lesions",
    "severe_repeat", "lesion_weight",
)
RESUME_MAY_CHANGE = ("lr",)
PATH_KEYS = ("data", "exclude", "split_file", "init")  # stored resolved, so a run resumes from any folder
LR_SCHEDULES = ("constant", "cosine")
# BCE and Dice losses are >= 0 and start near 0.7 (a coin flip per pixel); a batch loss above this means
# logits wrong by thousands on average: the run has diverged, even while the loss is still finite.
DIVERGED_LOSS = 1e4


@dataclass
class TrainConfig:
    """Every training setting. The defaults here are the only ones: ``minunet train`` builds its options' defaults
    from these fields (a field and its option share the name: ``batch_size`` is ``--batch-size``)."""

    data: str
    out: str
    mask: str = "lung"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi t/T)) / 2 over all T steps (optim.cosine_lr)
    loss: str = "bce"  # or "bce+dice": BCE plus the mean per-image soft Dice loss; "bce+dice+image" (losses.py)
    base_channels: int = 16
    depth: int = 4
    size: int = 256
    backend: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None
    augment: bool = False
    whiten_lesions: float = 0.0  # lung runs: probability of Augment's lesion whitening (needs infection masks)
    severe_repeat: int = 1  # lung runs: images whose lesions cover >= half the lung go this many times per epoch
    lesion_weight: float = 1.0  # lung runs: the BCE weight of the pixels inside the infection mask (1: off)
    exclude: str | None = None  # a file listing images to keep out of training and validation
    split_file: str | None = None  # a split file (data/split_files.py) whose train and val lists are used
    init: str | None = None  # a checkpoint whose weights the model starts from (Adam starts fresh)
    cache_dir: str | None = None  # None: data.default_cache_dir(); "" disables the cache
    workers: int = 2  # decoding threads
    threads: int | None = None  # compute threads per process; None: all cores, shared by a machine's MPI ranks

    def validate(self):
        """Raise ConfigError for settings that cannot work."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.base_channels >= 1, f"--base-channels must be >= 1, got {self.base_channels}"),
            (self.depth >= 1, f"--depth must be >= 1, got {self.depth}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {self.val_fraction}"),
            (self.limit is None or self.limit >= 2, f"--limit must be >= 2, got {self.limit}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown --lr-schedule {self.lr_schedule!r}"),
            (self.loss in LOSSES, f"unknown --loss {self.loss!r}: choose {' or '.join(LOSSES)}"),
            (self.mask in MASK_KINDS, f"unknown --mask {self.mask!r}: choose {' or '.join(MASK_KINDS)}"),
            (0 <= self.whiten_lesions <= 1, f"--whiten-lesions must be between 0 and 1, got {self.whiten_lesions}"),
            (not self.whiten_lesions or self.mask == "lung",
             "--whiten-lesions whitens the infected regions of the images while a lung model learns: it needs "
             "--mask lung"),
            (not self.whiten_lesions or self.augment,
             "--whiten-lesions is part of the augmentation: add --augment"),
            (self.severe_repeat >= 1, f"--severe-repeat must be >= 1, got {self.severe_repeat}"),
            (self.severe_repeat == 1 or self.mask == "lung",
             "--severe-repeat repeats the images whose lesions cover half the lung or more while a lung model "
             "learns: it needs --mask lung"),
            (self.lesion_weight >= 1 and math.isfinite(self.lesion_weight),
             f"--lesion-weight must be a number >= 1, got {self.lesion_weight}"),
            (self.lesion_weight == 1 or self.mask == "lung",
             "--lesion-weight weighs the infected pixels of the lung mask while a lung model learns: it needs "
             "--mask lung"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_size(self.size, self.depth)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _resolved(key: str, value):
    """A path setting as an absolute path without symlinks (a committed split's name stays a name)."""
    if value is None or (key == "split_file" and value in NAMED_SPLITS):
        return value
    return str(Path(value).expanduser().resolve())


def _comparable(key: str, value):
    """A setting as --resume compares it: paths resolved (a run saved before they were stored resolved
    compares its relative paths as seen from here)."""
    return _resolved(key, value) if key in PATH_KEYS else value


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data, --exclude, --split-file and --init paths resolved (``PATH_KEYS``)."""
    return dataclasses.replace(cfg, **{k: _resolved(k, getattr(cfg, k)) for k in PATH_KEYS})


# -- schedule ------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): constant, or cosine from lr down to 0 over the run."""
    if cfg.lr_schedule == "cosine":
        return cosine_lr(cfg.lr, step, total_steps)
    return cfg.lr


@dataclass
class TrainResult:
    status: str  # "done", "interrupted", "nonfinite" or "diverged"
    out: Path
    history: list = field(default_factory=list)
    best_dice: float = float("nan")
    best_epoch: int = 0
    message: str = ""
    stopped_by: str = ""  # for "interrupted": the signal, "SIGINT" (Ctrl-C) or "SIGTERM"


def _json_config(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def _position(state: dict) -> str:
    """Where a checkpoint of ``state`` stands, in words."""
    if state["batch"]:
        return f"epoch {state['epoch'] + 1}, batch {state['batch']}"
    return f"end of epoch {state['epoch']}" if state["epoch"] else "before the first step"


def _smaller_lr_advice(cfg: TrainConfig, out: Path, saved_at: str | None) -> str:
    """What to do after a non-finite or diverged loss: go on from the last checkpoint with a tenth of the lr."""
    lr = f"{cfg.lr / 10:g}"
    if saved_at is not None:
        return (f"the last good checkpoint is {out / 'last.npz'} ({saved_at}): continue from it with a smaller "
                f"learning rate: minunet train --resume --out {out} --lr {lr}")
    # With --force, the last.npz still in the folder belongs to the old run.
    force = " --force" if (out / "last.npz").exists() else ""
    return ("no checkpoint was saved yet (the first one is written when epoch 1 ends): start again with a "
            f"smaller learning rate, e.g. --lr {lr}{force}")


def train(cfg: TrainConfig, progress=None, resume: bool = False, force: bool = False) -> TrainResult:
    """Train a UNet as ``cfg`` says; ``resume`` continues the run in ``cfg.out``.

    The run folder is checked (a folder, writable) and locked before anything is decoded or trained.
    Under mpiexec every rank calls this (distributed.py); only rank 0's ``progress`` is called."""
    ranks = world()
    emit = (progress if ranks.is_root else None) or (lambda event, **info: None)
    with ranks.ending_every_rank_on_error(), contextlib.ExitStack() as stack:
        ranks.agree(cfg.validate)
        cfg = resolve_paths(cfg)
        out = Path(cfg.out).expanduser()
        ranks.from_root(lambda: _open_run_folder(out, resume, stack, emit))
        guard = stack.enter_context(InterruptGuard(emit))
        try:
            return _train_locked(cfg, out, emit, guard, resume, force, ranks)
        except _StopBeforeTraining:
            msg = f"interrupted ({guard.requested or 'SIGINT'}) before the first step: nothing to save"
            emit("interrupted", epoch=0, batch=0, message=msg)
            return TrainResult("interrupted", out, message=msg, stopped_by=guard.requested or "SIGINT")


def _open_run_folder(out: Path, resume: bool, stack: contextlib.ExitStack, emit):
    """Check the run folder ``out`` (a folder; one to resume holds a run), create it, and lock it until
    ``stack`` closes; remove what dead writers left there."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: choose another --out")
    if resume:
        check_resumable(out)
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the run folder {out} ({e.strerror or e}): choose another --out") \
                from None
    stale = stack.enter_context(lock_run_folder(out))
    if stale:
        emit("note", message=f"removed a stale lock of PID {stale['pid']} (started {stale['started']}; "
                             "that process no longer runs)")
    removed = remove_stale_temporaries(out)
    if removed:
        emit("note", message=f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} left "
                             f"in {out} by processes that no longer run")


# On an asynchronous backend (a GPU) the loop reads the losses every this many steps: reading one waits for
# every queued op, and the GPU would idle while the host prepares the next step. A CPU backend reads each.
LOSS_READ_EVERY = 8


class LossReader:
    """The steps' losses, read on the host in order: each at once on a CPU backend; on a GPU every
    ``every`` steps, at the end of an epoch and before a checkpoint, so that the steps in between stay queued.

    Reading adds each loss to the epoch's sum (``state['loss_sum']``, ``state['n_seen']``) and finds the
    first non-finite or diverged one; the loop then stops there. On a GPU the steps after it, up to the
    read, were taken too, but they are never saved: the run stops without writing a checkpoint."""

    def __init__(self, every: int):
        self.every, self.pending = every, []

    def add(self, epoch, batch, loss, n, state, read_now=False):
        """Keep a step's loss (a float, or a 0-d device array); read the kept ones when due. Returns
        (epoch, batch, loss) of the first bad loss read, or None."""
        self.pending.append((epoch, batch, loss, n))
        return self.read(state) if read_now or len(self.pending) >= self.every else None

    def read(self, state):
        """Read every kept loss, in order (see ``add``)."""
        pending, self.pending = self.pending, []
        for epoch, batch, loss, n in pending:
            loss = float(loss)
            if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                return epoch, batch, loss
            state["loss_sum"] += loss * n
            state["n_seen"] += n
        return None


def uploaded(loader, backend):
    """The loader's batches (b, x, y, w) with x, y and w handed to ``backend.upload_async``. The loop asks
    for batch k+1 after queueing the step that reads batch k, which is ``upload_async``'s contract: on a GPU
    the next batch's copy overlaps the step; on a CPU backend it is ``asarray``."""
    for b, x, y, w in loader:
        if w is None:
            x, y = backend.upload_async(x, y)
        else:
            x, y, w = backend.upload_async(x, y, w)
        yield b, x, y, w


def loss_stays_on_device(backend, ranks) -> bool:
    """Whether each step's loss stays on the device until ``LossReader`` reads it: one process on an
    asynchronous backend (a GPU). Several ranks sum their losses on the host at every step anyway
    (``ranks.sum_gradients``), so theirs are read at once."""
    return backend.asynchronous and ranks.size == 1


def batch_gradient(model, loss: str, x, y, ranks, w=None):
    """The loss of the batch (x, y) (BCE pixel weights w, or None; host or backend arrays), and its gradient
    in ``model.grads``, on every rank.

    Each rank takes its contiguous share x[lo:hi] (``ranks.shard``). Both losses are means over
    the batch (BCE over its pixels, the soft Dice over its images), so the share's loss and its
    gradient w.r.t. the logits are scaled by (hi - lo) / len(x): summed over the ranks they are the
    whole batch's, to float rounding. One process takes the whole batch unscaled.

    The loss is a float, except for one process on an asynchronous backend (a GPU): there it is a 0-d
    array on the device, so that the step is queued without waiting for it (``float()`` waits)."""
    be = model.backend
    lo, hi = ranks.shard(len(x))
    model.zero_grad()
    part = 0.0
    if hi > lo:  # a batch smaller than the number of ranks leaves some ranks without images
        logits = model.forward(be.asarray(x[lo:hi]))
        weights = None if w is None else be.asarray(w[lo:hi])
        part, dz = loss_and_grad(loss, logits, be.asarray(y[lo:hi]), be, weights, loss_stays_on_device(be, ranks))
        if ranks.size > 1:
            share = (hi - lo) / len(x)
            part *= share
            dz *= share
        model.backward(dz)
    return ranks.sum_gradients(model.grads, part, be)


class _StopBeforeTraining(Exception):
    """A signal asked to stop while the data was decoded."""


def _read_prior(cfg: TrainConfig, out: Path, resume: bool, force: bool) -> dict:
    """What the run folder holds, read on rank 0: for --resume, the run's settings (checked against
    ``cfg``), backend, number of ranks, file lists and last.npz; else the --init checkpoint, if any."""
    prior = {"saved": None, "ran_on": None, "ran_ranks": 1, "old_split": None, "ck": None, "init": None}
    if resume:
        info = load_run_info(out)
        saved = info["train"]
        # a setting newer than the run is compared as its default (what the run had without it)
        saved = {k: saved.get(k, _DEFAULTS.get(k)) for k in DETERMINISTIC_KEYS} | saved
        diffs = [f"{k} {getattr(cfg, k)!r} (the run has {saved.get(k)!r})" for k in DETERMINISTIC_KEYS
                 if k not in RESUME_MAY_CHANGE and _comparable(k, saved.get(k)) != getattr(cfg, k)]
        if diffs:
            raise ConfigError(f"--resume: the flags do not match the run in {out}: {', '.join(diffs)}; "
                              "drop those flags to continue the run as it was")
        ck = load_checkpoint(out / "last.npz")
        if ck.adam is None:
            raise ConfigError(f"{out / 'last.npz'} holds weights only: it cannot resume training")
        prior.update(saved=saved, ran_on=info.get("backend"),  # as resolved: never 'auto'
                     ran_ranks=info.get("ranks", 1), old_split=load_run_split(out), ck=ck)
    elif (out / "last.npz").exists() and not force:
        raise ConfigError(f"{out} already holds a run: continue it with --resume, or choose another --out "
                          "(or --force to start over)")
    elif cfg.init:  # checked before the data is decoded
        init = load_checkpoint(cfg.init)
        init.check_model_config({"in_channels": 1, "base_channels": cfg.base_channels, "depth": cfg.depth},
                                "--init needs a checkpoint of the same --base-channels and --depth")
        prior["init"] = init
    return prior


def lesion_items_for(data, train_items) -> list:
    """The infection-mask items of ``train_items`` (same images, in the same order), for lesion whitening:
    lung training reads the lung masks, and the whitening needs the infection masks of the same images."""
    try:
        by_image = {it.image: it for it in find_data(data, "infection").items()}
    except DataError as e:
        raise DataError(f"--whiten-lesions, --severe-repeat and --lesion-weight need the data's infection masks: "
                        f"{e}") from None
    missing = [it.name for it in train_items if it.image not in by_image]
    if missing:
        raise DataError(f"--whiten-lesions, --severe-repeat and --lesion-weight need an infection mask for every "
                        f"training image; {len(missing)} have none, e.g. {missing[0]}")
    return [by_image[it.image] for it in train_items]


def _train_locked(cfg: TrainConfig, out: Path, emit, guard: InterruptGuard, resume: bool, force: bool, ranks):
    """The training itself, in the locked run folder ``out``: check what --resume continues, decode the
    data, then the epochs; ``guard.requested`` stops it between steps with a saved last.npz. Each stage
    that can fail on some ranks only ends in ``ranks.agree``, so every rank stops with the same error."""
    prior = ranks.from_root(lambda: _read_prior(cfg, out, resume, force))
    ck: Checkpoint | None = prior["ck"]
    saved, ran_on = prior["saved"], prior["ran_on"]

    def find():
        index = find_data(cfg.data, cfg.mask)
        exclude = read_exclude(cfg.exclude) if cfg.exclude else None
        if cfg.split_file:
            split = split_from_file(index, cfg.split_file, exclude)
        else:
            split = make_split(index, cfg.val_fraction, cfg.seed, cfg.limit, exclude)
        if ranks.size > 1 or cfg.threads:
            limit_threads(cfg.threads or ranks.default_threads())
        if cfg.backend in ("auto", "cupy"):
            ranks.pick_gpu()
        backend, note = open_backend(cfg.backend)
        if resume and ran_on and backend.name != ran_on:  # the same ops in another order round differently
            raise ConfigError(f"--resume: the run in {out} used the {ran_on} backend; resuming on {backend.name} "
                              f"would not continue it bit for bit: pass --backend {ran_on}, or start a new run from "
                              f"its weights with --init {out / 'last.npz'} and another --out")
        needs_lesions = cfg.whiten_lesions or cfg.severe_repeat > 1 or cfg.lesion_weight != 1
        lesion_items = lesion_items_for(cfg.data, split.train) if needs_lesions else None
        split_json = split.to_json(index)
        old = prior["old_split"]
        if resume and (old is None or old.get("train") != split_json["train"] or old.get("val") != split_json["val"]):
            raise ConfigError(f"--resume: the data in {cfg.data} no longer gives the file lists in "
                              f"{out / 'split.json'}: restore the data or start a new run")
        check_training_memory(cfg.base_channels, cfg.depth, cfg.size, -(-cfg.batch_size // ranks.size),
                              len(split.train) + len(split.val), backend)
        return index, split, split_json, backend, note, lesion_items

    index, split, split_json, backend, note, lesion_items = ranks.agree(find)
    ranks.check_same(json.dumps(split_json, sort_keys=True).encode(), "training and validation files")
    emit("backend", name=backend.name, note=note)
    cache_dir = default_cache_dir() if cfg.cache_dir is None else (cfg.cache_dir or None)

    def decode_progress(what):
        def report(done, total):
            emit("decode", what=what, done=done, total=total)
            if guard.requested:  # decoding can take minutes: stop it (nothing is trained yet)
                raise _StopBeforeTraining

        return report

    def decode():
        train_set = load_arrays(split.train, cfg.size, cache_dir, cfg.workers, decode_progress("train"))
        if cfg.mask == "lung" and train_set.mask_stats.all_empty():  # every image has lungs: these masks are wrong
            raise DataError(f"every lung mask of the {len(train_set)} training images in {index.root} is empty: "
                            "check the masks (lungs marked with 255, or 1, on 0)")
        lesions = None if lesion_items is None else load_arrays(
            lesion_items, cfg.size, cache_dir, cfg.workers, decode_progress("infection masks")).masks
        return train_set, load_arrays(split.val, cfg.size, cache_dir, cfg.workers, decode_progress("val")), lesions

    # With a cache, the first rank of each machine decodes and writes it, and its other ranks read it.
    decode_once = ranks.local_first if cache_dir else ranks.agree
    train_set, val_set, lesions = decode_once(decode, (MinunetError, _StopBeforeTraining))
    if ranks.any(guard.requested):
        raise _StopBeforeTraining
    emit("data", describe=index.describe(), n_train=len(train_set), n_val=len(val_set), val_source=split.source,
         excluded=split.excluded, masks=train_set.mask_stats.describe(), cached=train_set.cached and val_set.cached)

    model = UNet(1, cfg.base_channels, cfg.depth, backend=backend, seed=cfg.seed)
    opt = Adam(model.params, model.grads, lr=cfg.lr, backend=backend)
    epoch_items = repeat_severe(train_set.masks, lesions, cfg.severe_repeat) if lesions is not None else None
    n_b = num_batches(len(train_set) if epoch_items is None else len(epoch_items), cfg.batch_size)
    total_steps = cfg.epochs * n_b
    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "n_seen": 0, "seconds": 0.0,
             "history": [], "best_dice": -1.0, "best_epoch": 0, "changes": []}
    saved_at = None  # where this run's last.npz stands, once there is one

    def load():
        if ck is not None:
            ck.load_into(model, opt)
            for k in state:
                state[k] = ck.meta["state"].get(k, state[k])  # checkpoints before "changes" have none
        elif prior["init"] is not None:
            prior["init"].load_into(model)

    ranks.agree(load)
    if ck is not None:
        saved_at = _position(state)
        at = {"epoch": state["epoch"] + 1, "batch": state["batch"], "step": state["step"]}
        where = f"at epoch {at['epoch']}, batch {at['batch']} (step {at['step']}): from there this run is no longer"
        if cfg.lr != saved["lr"]:
            state["changes"] = state["changes"] + [{"setting": "lr", "from": saved["lr"], "to": cfg.lr, **at}]
            emit("note", message=f"--lr changed from {saved['lr']:g} to {cfg.lr:g} {where} bitwise comparable with "
                                 f"one that kept --lr {saved['lr']:g} (config.json lists the change under "
                                 "\"changes\")")
        if prior["ran_ranks"] != ranks.size:
            state["changes"] = state["changes"] + [{"setting": "ranks", "from": prior["ran_ranks"],
                                                    "to": ranks.size, **at}]
            emit("note", message=f"resumed on {ranks.size} process(es), the run had {prior['ran_ranks']} {where} "
                                 "bitwise comparable with one that kept the same number (each rank's share of a "
                                 "batch and the order of the sums change; config.json lists the change under "
                                 "\"changes\")")
    state = ranks.share_state(model, opt, state)  # rank 0's weights, moments and position on every rank
    augment = Augment(whiten=cfg.whiten_lesions) if cfg.augment else None

    def write(path: Path, how):
        """Run ``how()``, which writes ``path``, on rank 0; an OSError (a full disk...) stops the run saying what
        is kept."""
        if not ranks.is_root:
            return
        try:
            how()
        except OSError as e:
            kept = (f"the previous {out / 'last.npz'} ({saved_at}) is kept: make room (or fix the folder), then "
                    f"continue with --resume --out {out}" if saved_at is not None
                    else "no checkpoint of this run was saved yet: make room (or fix the folder) and start again")
            raise OutputError(f"cannot write {path} ({e.strerror or e}): {kept}") from None

    run_info = {
        "minunet_version": __version__,
        "train": _json_config(cfg),
        "backend": backend.name,
        "model": model.config,
        "num_params": model.num_params(),
        "data": {"layout": index.layout, "root": str(index.root), "n_train": len(train_set), "n_val": len(val_set),
                 "val_source": split.source, "excluded": split.excluded, "masks": train_set.mask_stats.describe()},
        "changes": state["changes"],
        "ranks": ranks.size,
    }
    ranks.agree(lambda: write(out / "config.json", lambda: write_run_info(out, run_info, split_json)))

    def meta():  # "split": the file lists travel with the weights, so evaluate can tell training images apart
        return {"train_config": _json_config(cfg), "state": dict(state), "minunet_version": __version__,
                "rng": {"scheme": "numpy default_rng: order [seed, epoch], augmentation [seed, epoch, batch]",
                        "seed": cfg.seed}, "split": split_json, "ranks": ranks.size}

    def save(name):
        nonlocal saved_at
        write(out / name, lambda: save_checkpoint(out / name, model, opt, meta()))
        if name == "last.npz":
            saved_at = _position(state)

    def validate_progress(event, **info):
        emit(event, **info)
        if guard.requested and ranks.size == 1:  # an interrupt stops the validation too (redone on resume);
            raise KeyboardInterrupt  # ranks stop only together: after the validation, below

    def epoch_files():  # at the end of an epoch
        save("last.npz")
        if state["best_epoch"] == state["epoch"]:
            save("best.npz")
        write(out / "history.csv", lambda: write_history(out / "history.csv", state["history"]))
        write(out / "curves.png", lambda: draw_curves(out / "curves.png", state["history"]))

    def stopped(epoch, b, loss):  # a non-finite or diverged loss at epoch ``epoch`` (from 0), batch ``b``
        status = "nonfinite" if not math.isfinite(loss) else "diverged"
        what = (f"the loss became {loss}" if status == "nonfinite" else
                f"the loss reached {loss:.3g}, above {DIVERGED_LOSS:g} (BCE and Dice losses start near "
                "0.7 and fall): training has diverged")
        msg = f"{what} at epoch {epoch + 1}, batch {b + 1}: training stopped; {_smaller_lr_advice(cfg, out, saved_at)}"
        emit(status, epoch=epoch + 1, batch=b + 1, loss=loss, message=msg)
        return TrainResult(status, out, state["history"], state["best_dice"], state["best_epoch"], msg)

    losses = LossReader(LOSS_READ_EVERY if loss_stays_on_device(model.backend, ranks) else 1)
    consistent = True  # False while the parameters are half-way through an update
    try:
        if ranks.any(guard.requested):  # asked to stop since the data was decoded
            raise KeyboardInterrupt
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            loader = BatchLoader(train_set, cfg.batch_size, cfg.seed, epoch, start=state["batch"], augment=augment,
                                 lesions=lesions, items=epoch_items, lesion_weight=cfg.lesion_weight)
            emit("epoch_start", epoch=epoch + 1, epochs=cfg.epochs, n_batches=n_b, start=state["batch"])
            t_start = time.perf_counter() - state["seconds"]
            t_images, n_images = time.perf_counter(), 0
            for b, x, y, w in uploaded(loader, model.backend):
                lr = learning_rate(cfg, state["step"], total_steps)
                opt.lr = lr
                loss = batch_gradient(model, cfg.loss, x, y, ranks, w)
                consistent = False
                bad = losses.add(epoch, b, loss, len(x), state, read_now=b + 1 == n_b)
                if bad:
                    return stopped(*bad)
                opt.step()
                state["step"] += 1
                state["batch"] = b + 1
                state["seconds"] = time.perf_counter() - t_start
                consistent = True
                n_images += len(x)
                emit("batch", epoch=epoch + 1, batch=b + 1, n_batches=n_b, loss=loss, lr=lr,
                     images_per_s=n_images / max(time.perf_counter() - t_images, 1e-9))
                if ranks.any(guard.requested):
                    raise KeyboardInterrupt
            train_seconds = state["seconds"]  # the epoch's training, without its validation
            ev = ranks.evaluate(model, val_set, cfg.batch_size, progress=validate_progress)
            seconds = time.perf_counter() - t_start
            s = ev.summary
            score = selection_score(s, cfg.mask)
            row = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / max(state["n_seen"], 1),
                   "val_loss": s["loss"], "val_dice": s["dice"], "val_iou": s["iou"],
                   "val_dice_pooled": s["dice_pooled"], "val_dice_nonempty": s["dice_nonempty"],
                   "val_fp_image_rate": s["fp_image_rate"], "val_score": score,
                   "lr": learning_rate(cfg, state["step"], total_steps),
                   "seconds": seconds, "images_per_s": state["n_seen"] / max(train_seconds, 1e-9)}
            is_best = score > state["best_dice"]
            state["history"] = state["history"] + [row]
            if is_best:
                state["best_dice"], state["best_epoch"] = score, epoch + 1
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, n_seen=0, seconds=0.0)
            ranks.agree(epoch_files)  # a file rank 0 cannot write stops every rank
            emit("epoch_end", row=row, best=is_best, per_class=ev.per_group)
            if ranks.any(guard.requested):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        by = guard.requested or "SIGINT"  # a KeyboardInterrupt without a handled signal is a Ctrl-C
        msg = f"interrupted ({by}) at epoch {state['epoch'] + 1}, batch {state['batch']}/{n_b}"
        bad = losses.read(state) if consistent else None  # no unread loss goes into a checkpoint
        if bad:
            return stopped(*bad)
        if consistent:
            save("last.npz")
            msg += f"; saved {out / 'last.npz'}: continue with --resume --out {out}"
        elif saved_at is not None:
            msg += f"; kept the previous {out / 'last.npz'} ({saved_at}; stopped mid-update)"
        else:
            msg += "; nothing saved (stopped mid-update, before the first checkpoint)"
        emit("interrupted", epoch=state["epoch"] + 1, batch=state["batch"], message=msg)
        return TrainResult("interrupted", out, state["history"], state["best_dice"], state["best_epoch"], msg, by)
    emit("done", best_dice=state["best_dice"], best_epoch=state["best_epoch"], out=str(out))
    return TrainResult("done", out, state["history"], state["best_dice"], state["best_epoch"])
