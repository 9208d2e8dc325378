"""Helpers shared by the commands: default paths, options with the library's defaults, progress, model loading."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from minunet.data import MASK_KINDS
from minunet.train import TrainConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_DATA = ASSETS / "sample"
DEFAULT_MODEL = ASSETS / "model" / "lung_unet.npz"
DEFAULT_INFECTION_MODEL = ASSETS / "model" / "infection_unet.npz"

BACKENDS = click.Choice(["auto", "numpy", "numba", "cupy"], case_sensitive=False)
MASKS = click.Choice(MASK_KINDS, case_sensitive=False)
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def config_option(*decls, **kw):
    """A click option whose default, shown in --help, is TrainConfig's field of the same name
    (``--batch-size`` is ``batch_size``): the training defaults are written only there, and
    evaluate and summary share them."""
    name = decls[0].split("/")[0].lstrip("-").replace("-", "_")
    default = TRAIN_DEFAULTS[name]
    return click.option(*decls, default=default, show_default=default is not None, **kw)


def output_stem(f: Path) -> str:
    """The name an input's outputs are called by: its stem, or its whole name when the "suffix" is a
    number (DICOM files named by UID, e.g. 1.2.840.113619.2.55.3, differ only there)."""
    return f.name if f.suffix[1:].isdigit() else f.stem


def unique_name(stem: str, used: set) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... when an earlier input had the same name; added to ``used``."""
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def strict_json(obj, **kw) -> str:
    """JSON that strict parsers accept: a NaN or infinite float becomes null (never a bare NaN)."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kw)


def check_postprocess(threshold, min_area):
    """Refuse a --threshold outside (0, 1) and a --min-area outside [0, 1) (None: not given)."""
    from minunet.errors import ConfigError

    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"--threshold must be between 0 and 1, got {threshold}")
    if min_area is not None and not 0 <= min_area < 1:
        raise ConfigError(f"--min-area is a share of the image, between 0 and 1, got {min_area}")


def postprocess_of(ck, threshold=None, min_area=None) -> tuple[float, float]:
    """(threshold, min_area): the flags where given, else the model's defaults (``Checkpoint.postprocess``)."""
    check_postprocess(threshold, min_area)
    pp = ck.postprocess
    return (pp["threshold"] if threshold is None else threshold, pp["min_area"] if min_area is None else min_area)


def view_shift_of(ck, view_shift, size) -> int:
    """The shift of the shifted views at predict time (``minunet.views``): the flag where given, else the
    model's default (``Checkpoint.postprocess``); refused unless a whole number below ``size``."""
    from minunet.views import check_shift

    shift = ck.postprocess["view_shift"] if view_shift is None else view_shift
    check_shift(shift, size)
    return shift


VIEW_SHIFT_HELP = ("Average the probability of the image and of four copies shifted by this many pixels (up, "
                   "down, left, right; at the size scored), each shifted back: five forwards per image; 0: the "
                   "image alone.")


def shipped_model(mask: str) -> Path:
    """The shipped model for a mask kind: the lung model, or the lesion (infection) model."""
    return DEFAULT_INFECTION_MODEL if mask.lower() == "infection" else DEFAULT_MODEL


def load_model(path, backend_name="auto", base_channels=None, depth=None, option="--model"):
    """(model, checkpoint, backend note) from a checkpoint; checks explicit flags against its config."""
    from minunet.checkpoint import load_checkpoint
    from minunet.errors import CheckpointError
    from minunet.kernels import open_backend

    path = Path(path)
    if not path.exists() and path in (DEFAULT_MODEL, DEFAULT_INFECTION_MODEL):
        raise CheckpointError(
            f"the shipped model {path} is not there (this install has no pretrained model of that kind yet): "
            f"pass {option} with a checkpoint, e.g. {option} runs/sample/best.npz after 'minunet train'"
        )
    ck = load_checkpoint(path)
    ck.check_model_config({"base_channels": base_channels, "depth": depth})
    backend, note = open_backend(backend_name)
    return ck.build_model(backend), ck, note


class Bar:
    """A one-line progress bar on stderr when it is a terminal, with the time left (ETA).

    When stderr is a file or a pipe (``nohup ... > train.log``), a plain line
    every ``log_every`` seconds instead, so a long run still shows progress.
    The ETA extrapolates the rate since the label (e.g. ``epoch 3/10``) first
    appeared: a new label starts a new estimate.
    """

    def __init__(self, stream=None, log_every=60.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.last = 0.0 if self.tty else time.monotonic()
        self.shown = False
        self.label, self.t0, self.done0 = None, 0.0, 0

    def eta(self, now, done, total) -> str:
        """'ETA m:ss' (or h:mm:ss) for the rest of ``total``; '' until two points give a rate."""
        if done <= self.done0 or done >= total:
            return ""
        left = round((now - self.t0) / (done - self.done0) * (total - done))
        h, rest = divmod(left, 3600)
        m, s = divmod(rest, 60)
        return f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}"

    def update(self, label, done, total, extra="", force=False):
        now = time.monotonic()
        if label != self.label:
            self.label, self.t0, self.done0 = label, now, done

        def tail():  # ``extra`` may be a callable, called only for a line that is drawn
            text = extra() if callable(extra) else extra
            return " ".join(t for t in (f"{done}/{total}", self.eta(now, done, total), text) if t)

        if not self.tty:
            if now - self.last >= self.log_every and done < total:
                self.last = now
                self.stream.write(f"{label} {tail()}\n")
                self.stream.flush()
            return
        if not force and now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 28
        fill = int(width * done / max(total, 1))
        line = f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {tail()}"
        self.stream.write(line.ljust(100)[:140])
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.tty and self.shown:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
            self.shown = False
