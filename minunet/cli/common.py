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
    """A one-line progress bar on stderr when it is a terminal.

    When stderr is a file or a pipe (``nohup ... > train.log``), a plain line
    every ``log_every`` seconds instead, so a long run still shows progress.
    """

    def __init__(self, stream=None, log_every=60.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.last = 0.0 if self.tty else time.monotonic()
        self.shown = False

    def update(self, label, done, total, extra="", force=False):
        if not self.tty:
            now = time.monotonic()
            if now - self.last >= self.log_every and done < total:
                self.last = now
                self.stream.write(f"{label} {done}/{total} {extra}".rstrip() + "\n")
                self.stream.flush()
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 28
        fill = int(width * done / max(total, 1))
        line = f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {extra}"
        self.stream.write(line.ljust(100)[:140])
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.tty and self.shown:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
            self.shown = False
