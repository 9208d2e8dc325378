"""Checkpoints: model weights, Adam state, position in training and config, in one .npz; and the
model files ``minunet export`` writes for other tools (.safetensors, .onnx), each with a config.json.

Layout of the archive (``np.savez``, no pickles; ``np.savez_compressed`` for an export, which
``np.load`` reads the same way):

    __minunet__          the string "minunet-checkpoint" (how a checkpoint is recognised)
    format_version       int
    meta                 JSON: model config, train config, epoch, step, batch, RNG scheme, history...
    param/<name>         every model parameter (float32, or float16 for a shipped model)
    adam_m/<name>, adam_v/<name>   Adam's moments (absent in weights-only files)

A ``.safetensors`` export holds the same weights under PyTorch's names (``torch_twin.torch_name``:
``enc.0.0.weight``...), in PyTorch's layouts, so ``load_state_dict`` takes them; its metadata holds
``__minunet__``, ``format_version``, ``meta`` (the same JSON) and the architecture as strings.
``load_checkpoint`` reads both (a safetensors file is recognised by its header, whatever its name),
so an exported .safetensors is a model file wherever minunet takes one.

Writes go to a temporary file in the same folder, then ``os.replace``
(``atomicfile.atomic_write``): a crash, a kill, Ctrl-C or a full disk mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from minunet.atomicfile import atomic_write
from minunet.errors import CheckpointError, ConfigError

MAGIC = "minunet-checkpoint"
FORMAT_VERSION = 1
MODEL_KEYS = ("in_channels", "base_channels", "depth")
FORMATS = ("npz", "safetensors", "onnx")  # what ``minunet export`` writes; the first two are read back


def save_checkpoint(path, model, optimizer=None, meta=None, weights_dtype=None, compress=False) -> Path:
    """Write ``model``'s parameters (and ``optimizer``'s state, when given) with ``meta``.

    ``meta`` is any JSON-able dict (epoch, step, configs...); the model's
    config is stored under ``meta['model']``. ``weights_dtype='float16'``
    stores the weights in half precision (for a shipped model; the optimizer
    state is then usually left out). ``compress`` deflates the archive: worth
    it for a shipped file, whose meta (stored as UTF-32 by numpy) holds the split lists."""
    path = Path(path)
    be = model.backend
    meta = dict(meta or {})
    meta["model"] = model.config
    meta["weights_dtype"] = str(np.dtype(weights_dtype or model.dtype))
    meta["has_optimizer"] = optimizer is not None
    arrays = {
        "__minunet__": np.array(MAGIC),
        "format_version": np.array(FORMAT_VERSION),
        "meta": np.array(json.dumps(meta)),
    }
    for name, p in model.params.items():
        a = np.asarray(be.to_host(p))
        arrays[f"param/{name}"] = a.astype(weights_dtype) if weights_dtype else a
    if optimizer is not None:
        state = optimizer.state_dict()
        meta_opt = {k: state[k] for k in ("t", "lr", "betas", "eps")}
        arrays["adam"] = np.array(json.dumps(meta_opt))
        for name in model.params:
            arrays[f"adam_m/{name}"] = state["m"][name]
            arrays[f"adam_v/{name}"] = state["v"][name]
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))


def save_safetensors(path, model, meta, weights_dtype=None) -> Path:
    """Write ``model``'s parameters under their PyTorch names (as ``weights_dtype``; None keeps the model's)
    with ``meta`` in the metadata (safetensors metadata is string -> string: JSON and numbers as text)."""
    from safetensors.numpy import save

    from minunet.torch_twin import torch_name

    meta = {**meta, "model": model.config, "weights_dtype": str(np.dtype(weights_dtype or model.dtype)),
            "has_optimizer": False}
    tensors = {torch_name(n): np.ascontiguousarray(model.backend.to_host(p), dtype=weights_dtype or model.dtype)
               for n, p in model.params.items()}
    metadata = {"format": "pt", "__minunet__": MAGIC, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta),
                **{k: str(model.config[k]) for k in MODEL_KEYS}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(save(tensors, metadata)))


def is_safetensors(path) -> bool:
    """A safetensors file: an 8-byte little-endian header length that fits the file, then a JSON object."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(meta, params by minunet name) of a safetensors file written by ``save_safetensors``."""
    from safetensors import SafetensorError, safe_open

    from minunet.model import UNet
    from minunet.torch_twin import torch_name

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k).copy() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}): export it again") from None
    if metadata.get("__minunet__") != MAGIC:
        raise CheckpointError(f"{path} is a safetensors file without minunet's metadata: minunet reads the "
                              ".safetensors that 'minunet export' writes (or a .npz written by 'minunet train')")
    version = int(metadata.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {version}, newer than this minunet ({FORMAT_VERSION}): "
                              "upgrade minunet")
    meta = json.loads(metadata["meta"])
    depth = meta["model"]["depth"]
    levels = {k.split(".")[1] for k in tensors if k.startswith("enc.")}
    if depth != len(levels):
        raise CheckpointError(f"{path} says depth {depth} but holds {len(levels)} encoder levels: export it again")
    # The parameter names depend on the depth only: a 1-channel U-Net of that depth lists them cheaply.
    names = {torch_name(n): n for n in UNet(1, 1, depth).params}
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CheckpointError(f"{path} holds {unknown[0]}, which is not a weight of minunet's U-Net of depth "
                              f"{depth}: export it again")
    return meta, {names[k]: a for k, a in tensors.items()}


# -- export: what a shipped model keeps of its training record ---------------------------------

MACHINE_SETTINGS = ("out", "cache_dir", "workers", "threads")  # where and how fast it ran, not what it learned
FILE_SETTINGS = ("data", "exclude", "split_file", "init")  # files of the training machine: kept by name
KEPT_STATE = ("epoch", "step", "history", "best_dice", "best_epoch")  # the record, not the position in an epoch
KEPT_SPLIT = ("layout", "mask", "val_source", "excluded", "train", "val")  # names relative to the data folder


def path_name(path) -> str:
    """The last two components of a path, e.g. ``COVID-QU-Ex/Infection Segmentation Data``: a name a
    user recognises, without the folders of the machine it was on (any OS's separators)."""
    parts = [p for p in re.split(r"[\\/]", str(path)) if p and not re.fullmatch(r"[A-Za-z]:", p)]
    return "/".join(parts[-2:])


def exported_meta(ck: Checkpoint) -> dict:
    """``ck``'s meta as a shipped model keeps it: the training recipe (every path reduced to its
    ``path_name``: the data set's name, the exclude list's name...), the training record and the split
    lists; no machine path, no optimizer position. The split lists come from the run folder's
    split.json beside the checkpoint, or from ``ck`` when it was exported already."""
    meta = {k: ck.meta[k] for k in ("minunet_version", "rng") if k in ck.meta}
    meta["exported_from"] = path_name(ck.meta.get("exported_from", ck.path))  # e.g. lung256/best.npz
    if "train_config" in ck.meta:
        cfg = {k: v for k, v in ck.meta["train_config"].items() if k not in MACHINE_SETTINGS}
        meta["train_config"] = {k: path_name(v) if k in FILE_SETTINGS and v else v for k, v in cfg.items()}
    if "state" in ck.meta:
        meta["state"] = {k: ck.meta["state"][k] for k in KEPT_STATE if k in ck.meta["state"]}
    split_json = ck.path.parent / "split.json"
    try:
        split = json.loads(split_json.read_text()) if split_json.is_file() else ck.meta.get("split")
    except (OSError, ValueError):
        raise CheckpointError(f"{split_json} (the run's file lists) is damaged: restore it, or export a copy "
                              "of the checkpoint from a folder without it") from None
    if split is not None:
        meta["split"] = {k: split[k] for k in KEPT_SPLIT if k in split}
    if "postprocess" in ck.meta:
        meta["postprocess"] = dict(ck.meta["postprocess"])
    for grown in ("widened", "deepened"):  # train_config then describes the smaller model the weights came from
        if grown in ck.meta:
            meta[grown] = dict(ck.meta[grown])
    return meta


def format_of(out, fmt=None) -> str:
    """The format to write ``out`` in: ``fmt`` when given, else its suffix's (.npz, .safetensors, .onnx),
    else npz. ConfigError when ``fmt`` and a known suffix disagree, or OUT ends in .json (its config's name)."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix == "json":
        raise ConfigError(f"{out} ends in .json, the name of the config written beside the model: "
                          "name the model file e.g. model.safetensors")
    if fmt is None:
        return suffix if suffix in FORMATS else "npz"
    if suffix in FORMATS and suffix != fmt:
        raise ConfigError(f"--format {fmt} but {out} ends in .{suffix}: name it {Path(out).with_suffix('.' + fmt)}")
    return fmt


def config_path(out) -> Path:
    """Where the config of an export to ``out`` goes: ``out`` with its suffix replaced by .json."""
    return Path(out).with_suffix(".json")


def export_config(meta: dict, input_size: int, file: Path, about_file: dict) -> dict:
    """The config.json of an export: what another tool needs to run the model (architecture, input,
    post-processing), the training recipe and record without the split lists, and under ``files``
    what each exported file holds (``about_file``: format, weights dtype, output...). The formats of
    one model exported to the same stem share the config: an existing one of the same model keeps
    its other files' entries."""
    cfg = {
        "model": {"architecture": "U-Net (minunet)", **{k: meta["model"][k] for k in MODEL_KEYS}},
        "input": {"layout": "NCHW", "channels": meta["model"]["in_channels"], "size": input_size,
                  "multiple_of": 2 ** meta["model"]["depth"],
                  "preprocess": "8-bit grey image (DICOM: windowed), resized bilinear to size x size, divided by 255"},
        "postprocess": {"threshold": 0.5, "min_area": 0.0, "view_shift": 0, **meta.get("postprocess", {})},
    }
    cfg.update({k: meta[k] for k in ("minunet_version", "exported_from", "widened", "deepened", "train_config",
                                    "state")
                if k in meta})
    if "split" in meta:
        cfg["split"] = {k: len(v) if isinstance(v, list) else v for k, v in meta["split"].items()}
    try:
        old = json.loads(config_path(file).read_text())
    except (OSError, ValueError):
        old = None
    same = isinstance(old, dict) and isinstance(old.get("files"), dict) and \
        {k: v for k, v in old.items() if k != "files"} == cfg
    cfg["files"] = {**(old["files"] if same else {}), file.name: about_file}
    return cfg


def export_checkpoint(src, out, weights_dtype="keep", postprocess=None, fmt="npz", sigmoid=False,
                      dynamic=False, widen=1, deepen=False) -> Path:
    """Write ``src``'s weights (as ``weights_dtype``: float16, float32, or "keep" the precision they are
    stored in) with ``exported_meta``, without the optimizer state, in ``fmt`` (npz compressed,
    safetensors, or an ONNX graph: ``export_onnx``), and its config.json beside (``config_path``): the
    file to ship or share. ``postprocess`` (threshold, min_area, view_shift) becomes the model's default
    post-processing in evaluate, predict and quantify. ``widen`` > 1 writes a model of that many times
    the base width that computes the same (``minunet.widen``): a start for training a wider model;
    ``deepen`` one level deeper (``minunet.deepen``), after the widening if both are asked."""
    ck = load_checkpoint(src)
    if weights_dtype == "keep":
        weights_dtype = "float16" if any(a.dtype == np.float16 for a in ck.params.values()) else "float32"
    meta = exported_meta(ck)
    if postprocess:
        meta["postprocess"] = {**meta.get("postprocess", {}), **postprocess}
    model = ck.build_model("numpy")
    if widen != 1:
        from minunet.widen import NOISE, SEED, widened_model

        meta["widened"] = {"from_base_channels": model.base_channels, "factor": widen, "seed": SEED, "noise": NOISE}
        model = widened_model(model, widen, SEED, NOISE)
    if deepen:
        from minunet.deepen import SEED as DEEPEN_SEED
        from minunet.deepen import deepened_model

        meta["deepened"] = {"from_depth": model.depth, "seed": DEEPEN_SEED}
        model = deepened_model(model, DEEPEN_SEED)
    dtype = str(np.dtype(weights_dtype or model.dtype))
    about = {"format": fmt, "weights_dtype": dtype, "output": "logit (apply a sigmoid)"}
    if fmt == "npz":
        path = save_checkpoint(out, model, None, meta, weights_dtype, compress=True)
    elif fmt == "safetensors":
        path = save_safetensors(out, model, meta, weights_dtype)
        about["torch"] = {"module": "minunet.torch_twin.torch_twin(in_channels, base_channels, depth)",
                          "layouts": "Conv2d (Cout, Cin, k, k), ConvTranspose2d (Cin, Cout, 2, 2)"}
    elif fmt == "onnx":
        from minunet.export_onnx import save_onnx

        path, graph = save_onnx(out, model, {**meta, "model": model.config}, dtype, ck.input_size, dynamic, sigmoid)
        about.update(graph)
        if sigmoid:
            about["output"] = "probability (the sigmoid is in the graph)"
    else:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    cfg = export_config({**meta, "model": model.config}, ck.input_size, path, about)
    atomic_write(config_path(path), lambda f: f.write((json.dumps(cfg, indent=2) + "\n").encode()))
    return path


class Checkpoint:
    """A loaded checkpoint: ``meta`` (dict), ``params`` (name -> numpy array), ``adam`` (or None)."""

    def __init__(self, path, meta, params, adam):
        self.path, self.meta, self.params, self.adam = Path(path), meta, params, adam

    @property
    def model_config(self) -> dict:
        return dict(self.meta["model"])

    @property
    def postprocess(self) -> dict:
        """The model's default post-processing: ``threshold`` on sigmoid(logit) (0.5 unless the model
        says otherwise) and ``min_area``, the share of the image under which a predicted component is
        dropped (0: none), and ``view_shift``, the pixels by which the four shifted copies of the image are
        moved whose probabilities are averaged with the image's (``minunet.views``; 0: the image alone).
        Chosen on validation images and stored by ``minunet export``."""
        pp = self.meta.get("postprocess") or {}
        return {"threshold": float(pp.get("threshold", 0.5)), "min_area": float(pp.get("min_area", 0.0)),
                "view_shift": int(pp.get("view_shift", 0))}

    @property
    def input_size(self) -> int:
        """The image size the model was trained at (256 when the checkpoint does not say)."""
        return int(self.meta.get("train_config", {}).get("size", 256))

    def check_model_config(self, wanted: dict, hint: str = ""):
        """Raise CheckpointError when a key of ``wanted`` (e.g. depth) differs from the checkpoint's."""
        have = self.model_config
        diffs = [f"{k} {wanted[k]} (checkpoint has {have.get(k)})" for k in wanted
                 if wanted[k] is not None and k in have and have[k] != wanted[k]]
        if diffs:
            raise CheckpointError(
                f"checkpoint {self.path} does not match the flags: {', '.join(diffs)}"
                + (f": {hint}" if hint else ": drop those flags or pass the matching values")
            )

    def build_model(self, backend="numpy", dtype="float32"):
        """A UNet with this checkpoint's architecture and weights."""
        from minunet.model import UNet

        cfg = self.model_config
        model = UNet(cfg["in_channels"], cfg["base_channels"], cfg["depth"], backend=backend, dtype=dtype)
        self.load_into(model)
        return model

    def load_into(self, model, optimizer=None):
        """Copy the weights (and the Adam state, when both exist) into ``model`` / ``optimizer``."""
        self.check_model_config(self.model_config_of(model))
        if set(model.params) != set(self.params):
            missing = sorted(set(model.params) ^ set(self.params))
            raise CheckpointError(f"checkpoint {self.path} has different parameters ({missing[0]} ...): "
                                  "it was made by another version of the model")
        be = model.backend
        for name, p in model.params.items():
            a = self.params[name]
            if tuple(a.shape) != tuple(p.shape):
                raise CheckpointError(f"checkpoint {self.path}: {name} has shape {a.shape}, the model wants {p.shape}")
            p[...] = be.asarray(a.astype(model.dtype, copy=False))
        if optimizer is not None:
            if self.adam is None:
                raise CheckpointError(f"checkpoint {self.path} holds weights only: it cannot resume training")
            try:
                optimizer.load_state_dict(self.adam)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"checkpoint {self.path}: the optimizer state does not fit ({e})") from None

    @staticmethod
    def model_config_of(model) -> dict:
        return {k: model.config[k] for k in MODEL_KEYS}


# -- loading: what a checkpoint must hold before any command uses it -----------------------------

# What each part of the meta must be. Checked on loading, so a damaged or hand-made file is one line
# that names the part, never a TypeError deep inside a command. A kind is one of KINDS.
META_PARTS = {"model": dict, "train_config": dict, "state": dict, "postprocess": dict, "split": dict, "rng": dict,
              "weights_dtype": str, "exported_from": str, "minunet_version": str, "has_optimizer": bool,
              "widened": dict}
MODEL_KINDS = {"in_channels": "count", "base_channels": "count", "depth": "count"}  # all three required
PART_KINDS = {
    "train_config": {"size": "count"},
    "postprocess": {"threshold": "probability", "min_area": "share", "view_shift": "index"},
    "split": {"train": "names", "val": "names"},
}
# A run's position in training (train.py's ``state``; an export keeps some of it).
RUN_STATE = {"epoch": "index", "batch": "index", "step": "index", "loss_sum": "number", "n_seen": "index",
             "seconds": "number", "history": "list", "best_dice": "number", "best_epoch": "index",
             "changes": "list"}
ADAM_KINDS = {"t": "index", "lr": "number", "betas": "pair", "eps": "number"}


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


KINDS = {  # kind -> (test, what the value must be)
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "index": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "number": (_is_number, "a number"),
    "probability": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1"),
    "share": (lambda v: _is_number(v) and 0 <= v < 1, "a number from 0 to below 1"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of file names"),
    "pair": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) for b in v), "two numbers"),
}


def check_meta(path, meta, adam) -> None:
    """Raise CheckpointError unless ``meta`` (and ``adam``, the optimizer's settings, or None) have the parts
    and types above: the one place that says what a checkpoint's JSON must hold."""

    def refuse(key, value, wanted):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise CheckpointError(f"checkpoint {path}: its {f'meta {key}' if key else 'meta'} is {shown}, not {wanted}: "
                              "the file is damaged or was not written by minunet; use a checkpoint from "
                              "'minunet train' or 'minunet export'")

    def check_kinds(prefix, part, kinds, required=False):
        for k, kind in kinds.items():
            if k not in part:
                if required:
                    raise CheckpointError(f"checkpoint {path}: its meta lacks {prefix}.{k}: the file is damaged; "
                                          "use another checkpoint")
                continue
            test, wanted = KINDS[kind]
            if not test(part[k]):
                refuse(f"{prefix}.{k}", part[k], wanted)

    if not isinstance(meta, dict):
        refuse("", meta, "an object")
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {path} lacks its model config: it is damaged; use another checkpoint")
    for key, kind in META_PARTS.items():
        if key in meta and not isinstance(meta[key], kind):
            refuse(key, meta[key], {dict: "an object", str: "a string", bool: "true or false"}[kind])
    check_kinds("model", meta["model"], MODEL_KINDS, required=True)
    for key, kinds in PART_KINDS.items():
        check_kinds(key, meta.get(key, {}), kinds)
    if adam is not None:
        if not isinstance(adam, dict):
            refuse("adam", adam, "an object")
        check_kinds("adam", adam, ADAM_KINDS, required=True)
    check_kinds("state", meta.get("state", {}), RUN_STATE)


def check_finite(path, arrays: dict, what: str) -> None:
    """Raise CheckpointError naming the first of ``arrays`` (name -> array) that is not floating point or holds
    a NaN or an infinity: weights like that give NaN everywhere (a diverged run saved)."""
    for name, a in arrays.items():
        if a.dtype.kind != "f":
            raise CheckpointError(f"checkpoint {path}: {what} {name} is {a.dtype}, not floating point: the file is "
                                  "damaged or was not written by minunet; use another checkpoint")
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise CheckpointError(f"checkpoint {path}: {what} {name} holds NaN or inf ({bad} of {a.size} values): "
                                  "the run diverged before it was saved; use an earlier checkpoint (e.g. best.npz) "
                                  "or train again with a smaller --lr")


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint (.npz, or a .safetensors written by ``minunet export``); CheckpointError when it
    is missing, damaged or not a minunet checkpoint, when its meta does not have the parts and types
    ``check_meta`` wants, or when a weight is NaN or infinite."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model file {path} does not exist: pass --model with a checkpoint (e.g. runs/x/best.npz)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass --model with a checkpoint .npz or .safetensors file")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path} is an ONNX model, for other tools (e.g. onnxruntime): pass minunet the "
                              ".npz or .safetensors it was exported from")
    not_ours = f"{path} is not a minunet checkpoint: pass a .npz written by 'minunet train' (or a minunet export)"
    adam = None
    try:
        if is_safetensors(path):
            meta, params = _read_safetensors(path)
            check_meta(path, meta, None)
        else:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                if "__minunet__" not in files or str(z["__minunet__"]) != MAGIC:
                    raise CheckpointError(not_ours)
                version = int(z["format_version"])
                if version > FORMAT_VERSION:
                    raise CheckpointError(f"checkpoint {path} has format {version}, newer than this minunet "
                                          f"({FORMAT_VERSION}): upgrade minunet")
                meta = json.loads(str(z["meta"]))
                params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
                adam = json.loads(str(z["adam"])) if "adam" in files else None
                check_meta(path, meta, adam)
                if adam is not None:
                    adam["m"] = {k[len("adam_m/"):]: z[k] for k in z.files if k.startswith("adam_m/")}
                    adam["v"] = {k[len("adam_v/"):]: z[k] for k in z.files if k.startswith("adam_v/")}
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError, json.JSONDecodeError):
        raise CheckpointError(not_ours) from None
    check_finite(path, params, "parameter")
    if adam is not None:
        for moment in ("m", "v"):
            check_finite(path, adam[moment], f"Adam's {moment} of")
    return Checkpoint(path, meta, params, adam)
