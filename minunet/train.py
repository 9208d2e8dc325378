"""The training loop: epochs, validation, checkpoints, resume, Ctrl-C.

``train(config, progress)`` runs a whole training and writes to ``config.out``:

    config.json   every setting, plus what was found (backend, data, split sizes)
    split.json    the training and validation file lists (the held-out set)
    history.csv   one row per epoch: losses, val Dice/IoU, lr, seconds, images/s
    curves.png    loss and Dice per epoch (drawn with Pillow)
    last.npz      weights + Adam + position, every epoch and on Ctrl-C (resumable)
    best.npz      the same, at the epoch with the best validation score (metrics.selection_score:
                  mean Dice for lungs, dice_nonempty * (1 - fp_image_rate) for infection)

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

import csv
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from minunet import __version__
from minunet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from minunet.data import (
    ArraySet,
    Augment,
    BatchLoader,
    Split,
    default_cache_dir,
    find_data,
    iter_eval_batches,
    load_arrays,
    make_split,
    name_matches,
    num_batches,
    read_name_list,
)
from minunet.errors import ConfigError
from minunet.kernels.base import get_backend
from minunet.losses import loss_and_grad
from minunet.metrics import ScoreAccumulator, selection_score
from minunet.model import UNet
from minunet.optim import Adam, cosine_lr
from minunet.postprocess import keep_largest

# Settings that fix the sequence of updates: a resumed run must use the same ones.
DETERMINISTIC_KEYS = (
    "data", "mask", "batch_size", "lr", "lr_schedule", "loss", "base_channels", "depth", "size",
    "seed", "val_fraction", "limit", "augment", "exclude", "split_file", "init",
)


@dataclass
class TrainConfig:
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
    split_file: str | None = None  # a split file (splits.py): train on its train list, validate on its val list
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
            (self.lr_schedule in ("constant", "cosine"), f"unknown --lr-schedule {self.lr_schedule!r}"),
            (self.loss in ("bce", "bce+dice"), f"unknown --loss {self.loss!r}: choose bce or bce+dice"),
            (self.mask in ("lung", "infection"), f"unknown --mask {self.mask!r}: choose lung or infection"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_size(self.size, self.depth)


def split_from_file(index, split_file, exclude=None) -> Split:
    """The training and validation items named by a split file's train and val lists."""
    from minunet.splits import read_split, resolve_split_path, select

    parts = read_split(split_file)
    path = resolve_split_path(split_file)
    for p in ("train", "val"):
        if p not in parts:
            raise ConfigError(f"--split-file {path} has no {p} list: it needs train and val lists")
    items = index.items("all")
    names = set(exclude or ())
    kept = [it for it in items if not name_matches(it, names)]
    train, val = select(kept, parts["train"], str(path)), select(kept, parts["val"], str(path))
    if not val:
        raise ConfigError(f"none of the val images of {path} are in {index.root}: check DATA")
    return Split(train, val, f"split file {path.name}", len(items) - len(kept))


def check_size(size, depth):
    f = 2**depth
    if size < f or size % f:
        raise ConfigError(
            f"--size {size} is not divisible by 2**depth = {f}: use a multiple of {f} "
            f"(e.g. {max(f, size // f * f)}) or a smaller --depth"
        )


def resolve_backend(name: str, dtype: str = "float32"):
    """(backend, note): ``auto`` falls back to numpy, with a note, while numba is not installed."""
    try:
        return get_backend(name, dtype), None
    except ImportError as e:
        if name == "auto":
            return get_backend("numpy", dtype), f"the numba backend is not available ({e}); using numpy"
        raise ConfigError(f"the {name} backend is not available ({e}): use --backend numpy") from None
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"the {name} backend cannot start: {e}") from None  # e says what to do


# -- schedule ------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): constant, or cosine from lr down to 0 over the run."""
    if cfg.lr_schedule == "cosine":
        return cosine_lr(cfg.lr, step, total_steps)
    return cfg.lr


# -- evaluation ------------------------------------------------------------------


@dataclass
class EvalResult:
    """Scores over a set of images: overall, per class, and per image."""

    summary: dict  # ScoreAccumulator.summary() plus "loss" (mean BCE)
    per_group: dict  # class name -> summary
    dice_per_image: np.ndarray
    names: list

    def to_json(self) -> dict:
        out = dict(self.summary)
        out["per_class"] = self.per_group
        return out


def evaluate_model(model, data: ArraySet, batch_size: int = 8, threshold: float = 0.5, progress=None,
                   keep_largest_k: int = 0) -> EvalResult:
    """Mean per-image and pooled Dice/IoU of ``model`` on every image of ``data``.

    The prediction is sigmoid(logits) > threshold, then (when ``keep_largest_k``
    > 0) only its k largest connected components. Training's validation and
    ``minunet evaluate`` both call this."""
    if data.masks is None:
        raise ConfigError("these images have no masks, so they cannot be scored")
    be = model.backend
    overall, groups = ScoreAccumulator(), {}
    loss_sum = 0.0
    for start, x, y in iter_eval_batches(data, batch_size):
        logits = model.forward(be.asarray(x))
        loss, _ = be.sigmoid_bce(logits, be.asarray(y))
        loss_sum += loss * len(x)
        pred = np.asarray(be.to_host(be.sigmoid(logits))) > threshold
        if keep_largest_k > 0:
            pred = keep_largest(pred, keep_largest_k)
        overall.add(pred, y)
        for k in range(len(x)):
            g = data.groups[start + k] or "all"
            groups.setdefault(g, ScoreAccumulator()).add(pred[k : k + 1], y[k : k + 1])
        if progress is not None:
            progress("validate", done=start + len(x), total=len(data))
    summary = overall.summary()
    summary["loss"] = loss_sum / max(len(data), 1)
    return EvalResult(summary, {g: a.summary() for g, a in sorted(groups.items())}, overall.per_image_dice(),
                      list(data.names))


# -- the run folder --------------------------------------------------------------

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_dice_pooled", "val_dice_nonempty",
                  "val_fp_image_rate", "val_score", "lr", "seconds", "images_per_s")


def write_history(path: Path, rows):
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in HISTORY_FIELDS})
    tmp.replace(path)


def draw_curves(path: Path, rows):
    """Two panels, drawn with Pillow: loss (train, val) and Dice/IoU (val) per epoch."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, pad = 980, 400, 56
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    epochs = [r["epoch"] for r in rows]
    panels = [
        ("loss", [("train loss", "train_loss", (31, 119, 180)), ("val loss", "val_loss", (255, 127, 14))]),
        ("validation score", [("val Dice", "val_dice", (44, 160, 44)), ("val IoU", "val_iou", (148, 103, 189))]),
    ]
    pw = W // 2
    for k, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = k * pw + pad, (k + 1) * pw - 20, 34, H - 44
        vals = [r[key] for _, key, _ in series for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        span = hi - lo
        lo, hi = lo - 0.05 * span, hi + 0.05 * span
        e0, e1 = (min(epochs), max(epochs)) if epochs else (1, 1)
        if e1 == e0:
            e0, e1 = e0 - 1, e1 + 1

        def px(e, v, x0=x0, x1=x1, y0=y0, y1=y1, lo=lo, hi=hi, e0=e0, e1=e1):
            return x0 + (e - e0) / (e1 - e0) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, 10), title, fill=(0, 0, 0), font=font)
        for t in range(5):  # y ticks and grid
            v = lo + (hi - lo) * t / 4
            _, yy = px(e0, v)
            d.line([x0, yy, x1, yy], fill=(225, 225, 225))
            d.text((x0 - 50, yy - 6), f"{v:.3f}", fill=(0, 0, 0), font=font)
        step = max(1, len(epochs) // 10)
        for e in epochs[::step]:
            xx, _ = px(e, lo)
            d.line([xx, y1, xx, y1 + 4], fill=(0, 0, 0))
            d.text((xx - 4, y1 + 8), str(e), fill=(0, 0, 0), font=font)
        d.text(((x0 + x1) // 2 - 14, y1 + 22), "epoch", fill=(0, 0, 0), font=font)
        for j, (label, key, color) in enumerate(series):
            pts = [px(r["epoch"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            lx = x1 - 110  # legend: top right for the falling losses, bottom right for the rising scores
            ly = (y0 + 8 if k == 0 else y1 - 8 - 16 * len(series)) + 16 * j
            d.line([lx, ly + 6, lx + 18, ly + 6], fill=color, width=3)
            d.text((lx + 24, ly), label, fill=(0, 0, 0), font=font)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


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


def load_run_config(out) -> dict:
    """The saved config.json of a run folder (for --resume)."""
    path = Path(out) / "config.json"
    if not (Path(out) / "last.npz").is_file():
        raise ConfigError(f"there is no run to resume in {out} (no last.npz): start one without --resume")
    try:
        return json.loads(path.read_text())["train"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path} is missing or damaged: cannot resume; start a new run with another --out") from None


def train(cfg: TrainConfig, progress=None, resume: bool = False, force: bool = False) -> TrainResult:
    """Train a UNet as ``cfg`` says; ``resume`` continues the run in ``cfg.out``."""
    emit = progress or (lambda event, **info: None)
    cfg.validate()
    out = Path(cfg.out).expanduser()
    ck: Checkpoint | None = None
    if resume:
        saved = load_run_config(out)
        diffs = [f"{k} {getattr(cfg, k)!r} (the run has {saved.get(k)!r})" for k in DETERMINISTIC_KEYS
                 if saved.get(k) != getattr(cfg, k)]
        if diffs:
            raise ConfigError(f"--resume: the flags do not match the run in {out}: {', '.join(diffs)}; "
                              "drop those flags to continue the run as it was")
        ran_on = json.loads((out / "config.json").read_text()).get("backend")  # resolved: never 'auto'
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
    backend, note = resolve_backend(cfg.backend)
    if resume and ran_on and backend.name != ran_on:  # the same ops in another order round differently
        raise ConfigError(f"--resume: the run in {out} used the {ran_on} backend; resuming on {backend.name} would "
                          f"not continue it bit for bit: pass --backend {ran_on}, or start a new run from its weights "
                          f"with --init {out / 'last.npz'} and another --out")
    emit("backend", name=backend.name, note=note)
    split_json = split.to_json(index)
    if resume:
        try:
            old = json.loads((out / "split.json").read_text())
        except (OSError, ValueError):
            old = None
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
    (out / "config.json").write_text(json.dumps(run_info, indent=2) + "\n")
    (out / "split.json").write_text(json.dumps(split_json, indent=1) + "\n")

    def meta():
        return {"train_config": _json_config(cfg), "state": dict(state), "minunet_version": __version__,
                "rng": {"scheme": "numpy default_rng: order [seed, epoch], augmentation [seed, epoch, batch]",
                        "seed": cfg.seed}}

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
