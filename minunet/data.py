"""Datasets: find image/mask pairs, split them, decode once into a uint8 cache, batch them.

Two layouts are detected (``find_data``):

- COVID-QU-Ex: ``Lung Segmentation Data`` / ``Infection Segmentation Data``, then
  ``Train|Val|Test``, then one folder per class (``COVID-19``, ``Non-COVID``,
  ``Normal``), each with ``images/``, ``lung masks/`` and (infection part)
  ``infection masks/``. DATA may point at the top folder, at one part, at one
  split or at one class folder.
- generic: ``ROOT/images/*`` with ``ROOT/masks/<same name>`` (or the same stem
  with another extension, or ``<stem>_mask``), optionally under ``train/ val/ test/``.

Pixels: images become 8-bit grayscale (RGB converted), masks are binarised
(> 127 for 0/255 masks, > 0 for 0/1 masks: ``MaskStats`` says which were
found), both are resized to ``size`` x ``size`` (bilinear for images, nearest
for masks) and kept as uint8 (N, size, size) arrays. Batches are float32
(B, 1, size, size): images scaled by 1/255, masks 0/1.

Reproducibility: the order of epoch e is ``default_rng([seed, e])``'s
permutation and batch b's augmentation draws from ``default_rng([seed, e, b])``,
so any batch of any epoch can be rebuilt without replaying the ones before it
(a resumed run skips exactly the batches it had done).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from minunet.errors import DataError, MinunetWarning

QU_PARTS = ("Lung Segmentation Data", "Infection Segmentation Data")
MASK_KINDS = ("lung", "infection")
QU_MASK_DIRS = {"lung": "lung masks", "infection": "infection masks"}
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One image and its mask (None when the data has no masks)."""

    image: Path
    mask: Path | None
    group: str  # the class folder (COVID-19, Non-COVID, Normal) or "" for generic data
    name: str  # the image path relative to the data root, posix style


@dataclass
class DataIndex:
    """What ``find_data`` found: the layout and the items of each split."""

    root: Path
    layout: str  # "covid-qu-ex" or "generic"
    mask: str  # "lung" or "infection" (generic data: whatever masks/ holds)
    splits: dict  # split name (train, val, test or all) -> list[Item]

    def items(self, split: str = "all") -> list[Item]:
        if split == "all":
            return [it for s in self.splits.values() for it in s]
        if split not in self.splits:
            have = ", ".join(self.splits)
            raise DataError(f"{self.root} has no {split!r} split (it has: {have}): choose --split {have} or all")
        return list(self.splits[split])

    def describe(self) -> str:
        parts = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"{self.layout} layout at {self.root} ({self.mask} masks): {parts}"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _list_images(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdir(d: Path, name: str) -> Path | None:
    """The child folder of d named ``name``, ignoring case, or None."""
    if not d.is_dir():
        return None
    exact = d / name
    if exact.is_dir():
        return exact
    for c in d.iterdir():
        if c.is_dir() and c.name.lower() == name.lower():
            return c
    return None


def _is_qu_class(d: Path) -> bool:
    return _subdir(d, "images") is not None and any(_subdir(d, m) for m in QU_MASK_DIRS.values())


def _qu_classes(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted((c for c in d.iterdir() if c.is_dir() and _is_qu_class(c)), key=lambda c: c.name)


def _qu_split_dirs(d: Path) -> dict:
    out = {}
    for s in SPLITS:
        sd = _subdir(d, s)
        if sd is not None and _qu_classes(sd):
            out[s] = sd
    return out


def _scan_qu_class(cdir: Path, mask: str, root: Path, require_masks: bool) -> list[Item]:
    images_dir = _subdir(cdir, "images")
    mask_dir = _subdir(cdir, QU_MASK_DIRS[mask])
    if mask_dir is None and require_masks:
        other = [m for m in MASK_KINDS if m != mask and _subdir(cdir, QU_MASK_DIRS[m])]
        hint = f"use --mask {other[0]}" if other else "check the folder"
        if mask == "infection":
            hint += " or point at the 'Infection Segmentation Data' folder"
        raise DataError(f"no '{QU_MASK_DIRS[mask]}' folder in {cdir}: {hint}")
    items = []
    for img in _list_images(images_dir):
        m = mask_dir / img.name if mask_dir is not None else None
        if m is not None and not m.is_file():
            if require_masks:
                raise DataError(f"image {img} has no mask {m}: add the mask or remove the image")
            m = None
        items.append(Item(img, m, cdir.name, img.relative_to(root).as_posix()))
    return items


def _scan_generic(d: Path, root: Path, require_masks: bool) -> list[Item]:
    images_dir, masks_dir = _subdir(d, "images"), _subdir(d, "masks")
    if masks_dir is None and require_masks:
        raise DataError(
            f"{d} has images/ but no masks/ folder: put each image's mask in {d / 'masks'} under the same name"
        )
    masks = {}
    if masks_dir is not None:
        for p in _list_images(masks_dir):
            masks.setdefault(p.name, p)
            masks.setdefault(p.stem, p)
            if p.stem.endswith("_mask"):
                masks.setdefault(p.stem[: -len("_mask")], p)
    items = []
    for img in _list_images(images_dir):
        m = masks.get(img.name) or masks.get(img.stem)
        if m is None and require_masks:
            raise DataError(
                f"image {img} has no mask in {masks_dir}: add {masks_dir / img.name} or remove the image"
            )
        items.append(Item(img, m, "", img.relative_to(root).as_posix()))
    return items


def find_data(root, mask: str = "lung", require_masks: bool = True) -> DataIndex:
    """Detect the layout under ``root`` and list every image with its mask, split by split.

    Raises DataError for a missing or empty folder, an unknown layout, or an
    image without its mask (when ``require_masks``)."""
    if mask not in MASK_KINDS:
        raise DataError(f"unknown mask kind {mask!r}: choose lung or infection")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: pass the folder that holds the images and masks")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass the folder that holds images/ and masks/ (or COVID-QU-Ex data)")
    root = root.resolve()

    # COVID-QU-Ex, from the top down to one class folder.
    part = root
    present = [p for p in QU_PARTS if _subdir(root, p)]
    if present:
        wanted = [p for p in (QU_PARTS if mask == "lung" else QU_PARTS[1:]) if p in present]
        if not wanted:
            raise DataError(f"{root} has no '{QU_PARTS[1]}' folder, which --mask infection needs: use --mask lung")
        part = _subdir(root, wanted[0])
    splits = {}
    split_dirs = _qu_split_dirs(part)
    if split_dirs:
        for s, sd in split_dirs.items():
            splits[s] = [it for c in _qu_classes(sd) for it in _scan_qu_class(c, mask, root, require_masks)]
    elif _qu_classes(root):
        splits["all"] = [it for c in _qu_classes(root) for it in _scan_qu_class(c, mask, root, require_masks)]
    elif _is_qu_class(root):
        splits["all"] = _scan_qu_class(root, mask, root.parent, require_masks)
    if splits:
        layout = "covid-qu-ex"
    else:
        layout = "generic"
        if _subdir(root, "images") is not None:
            splits["all"] = _scan_generic(root, root, require_masks)
        else:
            for s in SPLITS:
                sd = _subdir(root, s)
                if sd is not None and _subdir(sd, "images") is not None:
                    splits[s] = _scan_generic(sd, root, require_masks)
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        loose = [p for p in root.iterdir() if _is_image(p)]
        if loose:
            raise DataError(
                f"{root} holds {len(loose)} image(s) but no images/ and masks/ folders: "
                f"move the images to {root / 'images'} and their masks to {root / 'masks'}"
            )
        raise DataError(
            f"no images found in {root}: expected images/ + masks/ (optionally under train/ val/ test/) "
            "or the COVID-QU-Ex layout"
        )
    return DataIndex(root, layout, mask, splits)


# -- choosing the training and validation sets ---------------------------------


def read_name_list(path) -> set:
    """Names listed in a text file, one a line ('#' starts a comment): for --exclude."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the name list {path}: {e.strerror or e}") from None
    return {ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()}


def name_matches(item: Item, names: set) -> bool:
    """True when a listed name is the item's relative path, a tail of it, or class/file name
    (how --exclude, --split-file and evaluate --only match names to images)."""
    parts = item.name.split("/")
    tails = {"/".join(parts[i:]) for i in range(len(parts))}
    return bool(tails & names) or f"{item.group}/{parts[-1]}" in names


@dataclass
class Split:
    """The images a run trains and validates on, and where the validation set came from."""

    train: list
    val: list
    source: str  # "dataset val split" or "seeded val fraction 0.xx"
    excluded: int = 0

    def to_json(self, index: DataIndex) -> dict:
        return {
            "data_root": str(index.root),
            "layout": index.layout,
            "mask": index.mask,
            "val_source": self.source,
            "excluded": self.excluded,
            "train": [it.name for it in self.train],
            "val": [it.name for it in self.val],
        }


def make_split(index: DataIndex, val_fraction=0.1, seed=0, limit=None, exclude=None) -> Split:
    """Training and validation items.

    The dataset's own val split is used when it has one. Otherwise the train
    split (or every image, when the data is not split) is divided per class:
    a seeded ``val_fraction`` of each class goes to validation. ``limit`` keeps
    a seeded pick of that many images before the division (and at most
    ``limit`` of the dataset's val split); ``exclude`` drops listed names."""
    names = exclude or set()
    rng = np.random.default_rng([seed, 1])

    def keep(items):
        return [it for it in items if not name_matches(it, names)]

    def pick(items, n):
        if n is None or n >= len(items):
            return items
        idx = np.sort(rng.permutation(len(items))[:n])
        return [items[i] for i in idx]

    if "val" in index.splits and "train" in index.splits:
        pool, val = keep(index.splits["train"]), keep(index.splits["val"])
        excluded = len(index.splits["train"]) + len(index.splits["val"]) - len(pool) - len(val)
        pool = pick(pool, limit)
        val = pick(val, None if limit is None else max(1, int(round(limit * 0.2))))
        split = Split(pool, val, "dataset val split", excluded)
    else:
        base = index.splits.get("train") or index.items("all")
        pool = keep(base)
        excluded = len(base) - len(pool)
        pool = pick(pool, limit)
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        groups = {}
        for i, it in enumerate(pool):
            groups.setdefault(it.group, []).append(i)
        val_idx = []
        for g in sorted(groups):
            members = groups[g]
            n_val = int(round(len(members) * val_fraction))
            if len(members) >= 2:
                n_val = min(max(n_val, 1), len(members) - 1)
            else:
                n_val = 0
            perm = np.random.default_rng([seed, 2, len(val_idx)]).permutation(len(members))
            val_idx += [members[j] for j in perm[:n_val]]
        vset = set(val_idx)
        split = Split(
            [it for i, it in enumerate(pool) if i not in vset],
            [pool[i] for i in sorted(vset)],
            f"seeded val fraction {val_fraction:g}",
            excluded,
        )
    if not split.train:
        raise DataError(f"no training images left in {index.root} (after --limit/--exclude): use more data")
    if not split.val:
        raise DataError(f"no validation images in {index.root}: use more images or a larger --val-fraction")
    return split


# -- decoding ----------------------------------------------------------------


def read_gray(path) -> np.ndarray:
    """An image file as an 8-bit grayscale (H, W) uint8 array (RGB and palettes converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.int64)
                shift = 8 if a.max() > 255 else 0
                return np.clip(a >> shift, 0, 255).astype(np.uint8)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist: check the path") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}): replace or remove the file") from None


def binarise_mask(m: np.ndarray) -> tuple[np.ndarray, str]:
    """(uint8 0/1 mask, convention): '0/1' masks are > 0, '0/255' masks are > 127, 'empty' is all zero."""
    mx = int(m.max()) if m.size else 0
    if mx == 0:
        return np.zeros_like(m, dtype=np.uint8), "empty"
    if mx <= 1:
        return (m > 0).astype(np.uint8), "0/1"
    return (m > 127).astype(np.uint8), "0/255"


def resize_gray(a: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if a.shape == (size, size):
        return a
    im = Image.fromarray(a).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_item(item: Item, size: int):
    """(image uint8 (size,size), mask uint8 0/1 (size,size) or None, mask convention, original (H,W))."""
    img = read_gray(item.image)
    if item.mask is None:
        return resize_gray(img, size), None, "none", img.shape
    raw = read_gray(item.mask)
    if raw.shape != img.shape:
        raise DataError(
            f"image {item.image} is {img.shape[1]}x{img.shape[0]} but its mask {item.mask} is "
            f"{raw.shape[1]}x{raw.shape[0]}: give them the same size"
        )
    m, kind = binarise_mask(raw)
    return resize_gray(img, size), resize_gray(m, size, nearest=True), kind, img.shape


@dataclass
class MaskStats:
    """How many masks were 0/255 (binarised at > 127), 0/1 (at > 0), or empty."""

    counts: dict = field(default_factory=dict)

    def describe(self) -> str:
        c = self.counts
        parts = []
        if c.get("0/255"):
            parts.append(f"{c['0/255']} 0/255 (binarised at >127)")
        if c.get("0/1"):
            parts.append(f"{c['0/1']} 0/1 (binarised at >0)")
        if c.get("empty"):
            parts.append(f"{c['empty']} empty")
        return "masks: " + (", ".join(parts) if parts else "none")


@dataclass
class ArraySet:
    """Decoded images and masks: uint8 (N, S, S) arrays (memory-mapped from the cache)."""

    images: np.ndarray
    masks: np.ndarray | None
    names: list
    groups: list
    mask_stats: MaskStats
    cached: bool = False  # True when read from the cache rather than decoded now

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def default_cache_dir() -> Path:
    """$MINUNET_CACHE, else $XDG_CACHE_HOME/minunet, else ~/.cache/minunet."""
    if os.environ.get("MINUNET_CACHE"):
        return Path(os.environ["MINUNET_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minunet"


def cache_key(items, size: int) -> str:
    """A hash of the file list (paths, sizes, modification times) and the size."""
    h = hashlib.sha256(f"minunet-cache v{CACHE_VERSION} size={size}\n".encode())
    for it in items:
        for p in (it.image, it.mask):
            if p is None:
                h.update(b"-\n")
                continue
            try:
                st = p.stat()
            except OSError:
                raise DataError(f"file {p} does not exist: check the data folder") from None
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_arrays(items, size: int, cache_dir=None, workers: int = 2, progress=None) -> ArraySet:
    """Decode ``items`` into uint8 arrays, through the cache when ``cache_dir`` is given.

    The cache holds ``<key>.images.npy``, ``<key>.masks.npy`` and ``<key>.json``
    (written last, so a half-written entry is never used); the key is
    ``cache_key(items, size)``, so a changed file list, file or size makes a
    new entry. ``progress(done, total)`` is called while decoding."""
    items = list(items)
    names, groups = [it.name for it in items], [it.group for it in items]
    has_masks = all(it.mask is not None for it in items)
    key = cache_key(items, size)
    if cache_dir:
        cache_dir = Path(cache_dir).expanduser()
        meta_path = cache_dir / f"{key}.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                images = np.load(cache_dir / f"{key}.images.npy", mmap_mode="r")
                masks = np.load(cache_dir / f"{key}.masks.npy", mmap_mode="r") if meta["has_masks"] else None
                if images.shape == (len(items), size, size):
                    return ArraySet(images, masks, names, groups, MaskStats(meta["mask_counts"]), cached=True)
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is rebuilt below

    n = len(items)
    images = np.empty((n, size, size), np.uint8)
    masks = np.empty((n, size, size), np.uint8) if has_masks else None
    counts = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes outside the GIL
        for i, (img, m, kind, _) in enumerate(pool.map(lambda it: decode_item(it, size), items)):
            images[i] = img
            if masks is not None:
                masks[i] = m
            counts[kind] = counts.get(kind, 0) + 1
            if progress is not None and (i % 64 == 0 or i == n - 1):
                progress(i + 1, n)
    stats = MaskStats(counts)

    if cache_dir:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for label, arr in (("images", images), ("masks", masks)):
                if arr is None:
                    continue
                tmp = cache_dir / f".{key}.{label}.{os.getpid()}.tmp.npy"
                np.save(tmp, arr)
                os.replace(tmp, cache_dir / f"{key}.{label}.npy")
            meta = {"version": CACHE_VERSION, "size": size, "n": n, "has_masks": has_masks, "mask_counts": counts}
            tmp = cache_dir / f".{key}.{os.getpid()}.tmp.json"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, cache_dir / f"{key}.json")
        except OSError as e:  # an unwritable cache only costs time: the arrays are in memory
            # stacklevel=1 ties the warning to this line, not to the caller's, so Python's default filter
            # shows it once however often load_arrays is called (training calls it for train and val).
            warnings.warn(f"cannot write the decoded-image cache in {cache_dir} ({e.strerror or e}): going on "
                          "without it; pass --cache-dir with a writable folder, or --no-cache", MinunetWarning,
                          stacklevel=1)
    return ArraySet(images, masks, names, groups, stats, cached=False)


# -- batches -----------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training images in epoch ``epoch`` (0-based): a seeded permutation."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@dataclass
class Augment:
    """Seeded augmentation: a small rotation and shift (image bilinear, mask nearest), then intensity.

    intensity: x -> clip(contrast * x**gamma + brightness, 0, 1)."""

    max_rotate: float = 7.0  # degrees
    max_shift: float = 0.06  # fraction of the size
    contrast: float = 0.15  # factor in [1 - c, 1 + c]
    brightness: float = 0.08  # added, in [-b, b]
    gamma: float = 0.25  # exponent in [1/(1+g), 1+g]

    def apply(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """img uint8 (S,S), mask uint8 (S,S) -> float32 image in [0, 1], uint8 mask."""
        s = img.shape[-1]
        angle = rng.uniform(-self.max_rotate, self.max_rotate)
        tx, ty = (int(round(v)) for v in rng.uniform(-self.max_shift * s, self.max_shift * s, 2))
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        g = float(np.exp(rng.uniform(-np.log1p(self.gamma), np.log1p(self.gamma))))
        im = Image.fromarray(np.ascontiguousarray(img)).rotate(angle, Image.BILINEAR, translate=(tx, ty))
        mk = Image.fromarray(np.ascontiguousarray(mask)).rotate(angle, Image.NEAREST, translate=(tx, ty))
        x = np.asarray(im, np.float32) / np.float32(255)
        x = np.clip(c * np.power(x, g) + b, 0, 1).astype(np.float32)
        return x, np.asarray(mk, np.uint8)


def make_batch(data: ArraySet, ids, augment: Augment | None = None, rng=None):
    """x float32 (B,1,S,S) in [0,1] and y float32 (B,1,S,S) in {0,1} for the images ``ids``."""
    ids = np.asarray(ids)
    sorted_ids, back = np.sort(ids), np.argsort(np.argsort(ids))  # sorted reads from the memmap, then batch order
    imgs = np.asarray(data.images[sorted_ids])[back]
    msks = np.asarray(data.masks[sorted_ids])[back]
    if augment is None:
        x = imgs.astype(np.float32) / np.float32(255)
        y = msks.astype(np.float32)
    else:
        x = np.empty(imgs.shape, np.float32)
        y = np.empty(imgs.shape, np.float32)
        for k in range(len(ids)):
            x[k], m = augment.apply(imgs[k], msks[k], rng)
            y[k] = m
    return x[:, None], y[:, None]


class BatchLoader:
    """Batches ``start..n_batches-1`` of one epoch, built by a background thread one batch ahead.

    Batch b holds ``order[b*B:(b+1)*B]`` (the last one may be short) and is
    augmented with ``default_rng([seed, epoch, b])``; iterating yields
    (b, x, y)."""

    def __init__(self, data: ArraySet, batch_size: int, seed: int, epoch: int, start: int = 0,
                 augment: Augment | None = None, prefetch: int = 2):
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, epoch
        self.order = epoch_order(len(data), seed, epoch)
        self.n_batches = num_batches(len(data), batch_size)
        self.start, self.augment, self.prefetch = start, augment, prefetch

    def batch(self, b: int):
        ids = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, b])
        return make_batch(self.data, ids, self.augment, rng)

    def __len__(self):
        return max(0, self.n_batches - self.start)

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for b in range(self.start, self.n_batches):
                    if not put((b, *self.batch(b))):
                        return
                put(None)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        t = threading.Thread(target=work, name="minunet-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)


def iter_eval_batches(data: ArraySet, batch_size: int):
    """(start index, x, y) over every image in order, no augmentation (y is None without masks)."""
    for s in range(0, len(data), batch_size):
        ids = np.arange(s, min(s + batch_size, len(data)))
        x = np.asarray(data.images[ids]).astype(np.float32)[:, None] / np.float32(255)
        y = None if data.masks is None else np.asarray(data.masks[ids]).astype(np.float32)[:, None]
        yield s, x, y
