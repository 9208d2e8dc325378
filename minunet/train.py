"""The training loop: epochs, validation, checkpoints, resume, Ctrl-C.

``train(config, progress)`` runs a whole training and writes the run folder
``config.out`` (runfolder.py lists its files). ``TrainConfig`` holds every
setting and its default; the ``minunet train`` options take their defaults from it.

Determinism: epoch e visits the images in ``data.epoch_order(n, seed, e)`` and
batch b is augmented from ``default_rng([seed, e, b])``. A checkpoint records
(epoch, batches done, optimizer step, the epoch's running loss), so a resumed
run rebuilds exactly the batches still to do and ends with the same weights,
bit for bit, as an uninterrupted run on the same backend (so ``--resume``
refuses another one; ``auto`` is compared by the backend it resolved to).

Nothing here prints: every event goes to ``progress(event, **info)``, which the
CLI renders (events: backend, data, decode, epoch_start, batch, validate,
epoch_end, interrupt_requested, interrupted, nonfinite, done).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minunet import __version__
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
    read_name_list,
    split_from_file,
)
from minunet.errors import ConfigError
from minunet.evaluation import evaluate_model
from minunet.kernels import open_backend
from minunet.losses import LOSSES, loss_and_grad
from minunet.metrics import selection_score
from minunet.model import UNet, check_size
from minunet.optim import Adam, cosine_lr
from minunet.runfolder import load_run_info, load_run_split, write_history, write_run_info

# Settings that fix the sequence of updates: a resumed run must use the same ones.
DETERMINISTIC_KEYS = (
    "data", "mask", "batch_size", "lr", "lr_schedule", "loss", "base_channels", "depth", "size",
    "seed", "val_fraction", "limit", "augment", "exclude", "split_file", "init",
)
LR_SCHEDULES = ("constant", "cosine")


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
    loss: str = "bce"  # or "bce+dice": BCE plus the mean per-image soft Dice loss
    base_channels: int = 16
    depth: int = 4
    size: int = 256
    backend: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None
    augment: bool = False
    exclude: str | None = None  # a file listing images to keep out of training and validation
    split_file: str | None = None  # a split file (data/split_files.py) whose train and val lists are used
    init: str | None = None  # a checkpoint whose weights the model starts from (Adam starts fresh)
    cache_dir: str | None = None  # None: data.default_cache_dir(); "" disables the cache
    workers: int = 2  # decoding threads

    def validate(self):
        """Raise ConfigError for settings that cannot work."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.base_channels >= 1, f"--base-channels must be >= 1, got {self.base_channels}"),
            (self.depth >= 1, f"--depth must be >= 1, got {self.depth}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {self.val_fraction}"),
            (self.limit is None or self.limit >= 2, f"--limit must be >= 2, got {self.limit}"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown --lr-schedule {self.lr_schedule!r}"),
            (self.loss in LOSSES, f"unknown --loss {self.loss!r}: choose {' or '.join(LOSSES)}"),
            (self.mask in MASK_KINDS, f"unknown --mask {self.mask!r}: choose {' or '.join(MASK_KINDS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_size(self.size, self.depth)




# -- schedule ------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): constant, or cosine from lr down to 0 over the run."""
    if cfg.lr_schedule == "cosine":
        return cosine_lr(cfg.lr, step, total_steps)
    return cfg.lr


class _InterruptGuard:
    """Turns the first Ctrl-C into a flag checked between steps (so a step is never cut in half);
    a second Ctrl-C interrupts at once. Only installs itself in the main thread."""

    def __init__(self, emit):
        self.requested = False
        self.emit = emit
        self.old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.emit("interrupt_requested")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


@dataclass
class TrainResult:
    status: str  # "done", "interrupted" or "nonfinite"
    out: Path
    history: list = field(default_factory=list)
    best_dice: float = float("nan")
    best_epoch: int = 0
    message: str = ""


def _json_config(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def train(cfg: TrainConfig, progress=None, resume: bool = False, force: bool = False) -> TrainResult:
    """Train a UNet as ``cfg`` says; ``resume`` continues the run in ``cfg.out``."""
    emit = progress or (lambda event, **info: None)
    cfg.validate()
    out = Path(cfg.out).expanduser()
    ck: Checkpoint | None = None
    if resume:
        info = load_run_info(out)
        saved = info["train"]
        diffs = [f"{k} {getattr(cfg, k)!r} (the run has {saved.get(k)!r})" for k in DETERMINISTIC_KEYS
                 if saved.get(k) != getattr(cfg, k)]
        if diffs:
            raise ConfigError(f"--resume: the flags do not match the run in {out}: {', '.join(diffs)}; "
                              "drop those flags to continue the run as it was")
        ran_on = info.get("backend")  # as resolved: never 'auto'
        ck = load_checkpoint(out / "last.npz")
        if ck.adam is None:
            raise ConfigError(f"{out / 'last.npz'} holds weights only: it cannot resume training")
    elif (out / "last.npz").exists() and not force:
        raise ConfigError(f"{out} already holds a run: continue it with --resume, or choose another --out "
                          "(or --force to start over)")
    init = None
    if cfg.init and ck is None:  # checked before the data is decoded
        init = load_checkpoint(cfg.init)
        init.check_model_config({"in_channels": 1, "base_channels": cfg.base_channels, "depth": cfg.depth},
                                "--init needs a checkpoint of the same --base-channels and --depth")
    out.mkdir(parents=True, exist_ok=True)

    index = find_data(cfg.data, cfg.mask)
    exclude = read_name_list(cfg.exclude) if cfg.exclude else None
    if cfg.split_file:
        split = split_from_file(index, cfg.split_file, exclude)
    else:
        split = make_split(index, cfg.val_fraction, cfg.seed, cfg.limit, exclude)
    backend, note = open_backend(cfg.backend)
    if resume and ran_on and backend.name != ran_on:  # the same ops in another order round differently
        raise ConfigError(f"--resume: the run in {out} used the {ran_on} backend; resuming on {backend.name} would "
                          f"not continue it bit for bit: pass --backend {ran_on}, or start a new run from its weights "
                          f"with --init {out / 'last.npz'} and another --out")
    emit("backend", name=backend.name, note=note)
    split_json = split.to_json(index)
    if resume:
        old = load_run_split(out)
        if old is None or old.get("train") != split_json["train"] or old.get("val") != split_json["val"]:
            raise ConfigError(f"--resume: the data in {cfg.data} no longer gives the file lists in "
                              f"{out / 'split.json'}: restore the data or start a new run")
    cache_dir = default_cache_dir() if cfg.cache_dir is None else (cfg.cache_dir or None)

    def decode_progress(what):
        return lambda done, total: emit("decode", what=what, done=done, total=total)

    train_set = load_arrays(split.train, cfg.size, cache_dir, cfg.workers, decode_progress("train"))
    val_set = load_arrays(split.val, cfg.size, cache_dir, cfg.workers, decode_progress("val"))
    emit("data", describe=index.describe(), n_train=len(train_set), n_val=len(val_set), val_source=split.source,
         excluded=split.excluded, masks=train_set.mask_stats.describe(), cached=train_set.cached and val_set.cached)

    model = UNet(1, cfg.base_channels, cfg.depth, backend=backend, seed=cfg.seed)
    opt = Adam(model.params, model.grads, lr=cfg.lr, backend=backend)
    n_b = num_batches(len(train_set), cfg.batch_size)
    total_steps = cfg.epochs * n_b
    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "n_seen": 0, "seconds": 0.0,
             "history": [], "best_dice": -1.0, "best_epoch": 0}
    if ck is not None:
        ck.load_into(model, opt)
        for k in state:
            state[k] = ck.meta["state"][k]
    elif init is not None:
        init.load_into(model)
    augment = Augment() if cfg.augment else None

    run_info = {
        "minunet_version": __version__,
        "train": _json_config(cfg),
        "backend": backend.name,
        "model": model.config,
        "num_params": model.num_params(),
        "data": {"layout": index.layout, "root": str(index.root), "n_train": len(train_set), "n_val": len(val_set),
                 "val_source": split.source, "excluded": split.excluded, "masks": train_set.mask_stats.describe()},
    }
    write_run_info(out, run_info, split_json)

    def meta():  # "split": the file lists travel with the weights, so evaluate can tell training images apart
        return {"train_config": _json_config(cfg), "state": dict(state), "minunet_version": __version__,
                "rng": {"scheme": "numpy default_rng: order [seed, epoch], augmentation [seed, epoch, batch]",
                        "seed": cfg.seed}, "split": split_json}

    def save(name):
        return save_checkpoint(out / name, model, opt, meta())

    be = model.backend
    consistent = True  # False while the parameters are half-way through an update
    with _InterruptGuard(emit) as guard:
        try:
            while state["epoch"] < cfg.epochs:
                epoch = state["epoch"]
                loader = BatchLoader(train_set, cfg.batch_size, cfg.seed, epoch, start=state["batch"], augment=augment)
                emit("epoch_start", epoch=epoch + 1, epochs=cfg.epochs, n_batches=n_b, start=state["batch"])
                t_start = time.perf_counter() - state["seconds"]
                t_images, n_images = time.perf_counter(), 0
                for b, x, y in loader:
                    lr = learning_rate(cfg, state["step"], total_steps)
                    opt.lr = lr
                    model.zero_grad()
                    logits = model.forward(be.asarray(x))
                    loss, dz = loss_and_grad(cfg.loss, logits, be.asarray(y), be)
                    if not math.isfinite(loss):
                        # This run has a last.npz once an epoch ended or when it resumed from one (with
                        # --force, the file still in the folder before that belongs to the old run).
                        kept = (f"the last good checkpoint is {out / 'last.npz'}" if ck is not None or state["epoch"]
                                else "no checkpoint was saved yet (the first one is written when epoch 1 ends)")
                        msg = (f"the loss became {loss} at epoch {epoch + 1}, batch {b + 1}: training stopped; "
                               f"{kept} (try a smaller --lr)")
                        emit("nonfinite", epoch=epoch + 1, batch=b + 1, loss=loss, message=msg)
                        return TrainResult("nonfinite", out, state["history"], state["best_dice"],
                                           state["best_epoch"], msg)
                    model.backward(dz)
                    consistent = False
                    opt.step()
                    state["step"] += 1
                    state["batch"] = b + 1
                    state["loss_sum"] += loss * len(x)
                    state["n_seen"] += len(x)
                    state["seconds"] = time.perf_counter() - t_start
                    consistent = True
                    n_images += len(x)
                    emit("batch", epoch=epoch + 1, batch=b + 1, n_batches=n_b, loss=loss, lr=lr,
                         images_per_s=n_images / max(time.perf_counter() - t_images, 1e-9))
                    if guard.requested:
                        raise KeyboardInterrupt
                # validation (an interrupt here resumes at the validation)
                ev = evaluate_model(model, val_set, cfg.batch_size, progress=emit)
                seconds = time.perf_counter() - t_start
                s = ev.summary
                score = selection_score(s, cfg.mask)
                row = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / max(state["n_seen"], 1),
                       "val_loss": s["loss"], "val_dice": s["dice"], "val_iou": s["iou"],
                       "val_dice_pooled": s["dice_pooled"], "val_dice_nonempty": s["dice_nonempty"],
                       "val_fp_image_rate": s["fp_image_rate"], "val_score": score,
                       "lr": learning_rate(cfg, state["step"], total_steps),
                       "seconds": seconds, "images_per_s": state["n_seen"] / max(seconds, 1e-9)}
                is_best = score > state["best_dice"]
                state["history"] = state["history"] + [row]
                if is_best:
                    state["best_dice"], state["best_epoch"] = score, epoch + 1
                state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, n_seen=0, seconds=0.0)
                save("last.npz")
                if is_best:
                    save("best.npz")
                write_history(out / "history.csv", state["history"])
                draw_curves(out / "curves.png", state["history"])
                emit("epoch_end", row=row, best=is_best, per_class=ev.per_group)
                if guard.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            msg = f"interrupted at epoch {state['epoch'] + 1}, batch {state['batch']}/{n_b}"
            if consistent:
                save("last.npz")
                msg += f"; saved {out / 'last.npz'}: continue with --resume --out {out}"
            else:
                msg += f"; kept the previous {out / 'last.npz'} (stopped mid-update)"
            emit("interrupted", epoch=state["epoch"] + 1, batch=state["batch"], message=msg)
            return TrainResult("interrupted", out, state["history"], state["best_dice"], state["best_epoch"], msg)
    emit("done", best_dice=state["best_dice"], best_epoch=state["best_epoch"], out=str(out))
    return TrainResult("done", out, state["history"], state["best_dice"], state["best_epoch"])
