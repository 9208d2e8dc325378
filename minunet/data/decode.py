"""Decoding: image files to uint8 arrays, once, through an on-disk cache.

Images become 8-bit grey (H, W) arrays (``read_image``):

- 8-bit grey as it is; colour converted to grey; an alpha channel dropped; a palette converted;
- 16-bit (and 32-bit integer) data scaled by its stored range: ``255 / (2**bits - 1)``, where
  ``bits`` is the bit depth the file declares (a PNG's sBIT chunk), else the fewest bits that hold
  the image's largest value (12-bit data whose maximum is 4095, or 3000: bits 12, scaled by
  255/4095), never fewer than 8 (16-bit files that hold 8-bit values are kept as they are);
- float data (and signed integers) min-max scaled: the image's smallest value -> 0, largest -> 255;
  NaN or inf is refused;
- DICOM (a ``.dcm`` file, or one without an extension that carries the DICOM preamble) as radiology
  software shows it: Modality LUT, VOI LUT or window (else a robust range), MONOCHROME1 inverted
  (``dicom.py``).

Masks are read without converting to grey (``read_mask``): a colour mask's foreground is where any
channel is, and a transparent pixel is background. Then the rule comes from the values the mask
holds (``binarise_mask``): one nonzero value -> that value is foreground ('0/1', '0/255' or '0/v');
several values, some above 127 -> > 127 (anti-aliased 0/255, 'graded'); several values, none above
127 (a label map, a faint drawing) -> refused, naming the file and the values. ``MaskStats`` counts
each convention, the colour masks and the images that were not plain 8-bit grey.

Images and masks are resized to ``size`` x ``size`` (bilinear for images, nearest for masks) and kept
as uint8 (N, size, size) arrays (``ArraySet``), memory-mapped from the cache on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from minunet.atomicfile import atomic_write, remove_stale_temporaries
from minunet.data.dicom import looks_like_dicom, read_dicom
from minunet.data.discover import Item
from minunet.errors import DataError, MinunetWarning

CACHE_VERSION = 2  # 2: 16-bit and float images scaled by their range, masks read by the values they hold


@contextmanager
def _opened(path: Path):
    """The loaded PIL image at ``path``; any failure to read it is a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            yield im
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist: check the path") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}): replace or remove the file") from None


def _png_sbit(path: Path) -> int | None:
    """The significant bits of grey a PNG declares in its sBIT chunk (Pillow skips the chunk); None if none."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while len(head := f.read(8)) == 8:
            length, cid = int.from_bytes(head[:4], "big"), head[4:]
            if cid == b"sBIT":
                data = f.read(length)
                return data[0] if data and 1 <= data[0] <= 16 else None
            if cid == b"IDAT":  # sBIT comes before the image data
                return None
            f.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC
    return None


def _min_max(a: np.ndarray, path: Path) -> np.ndarray:
    """Float or signed data -> uint8: the smallest value 0, the largest 255 (a flat image is all 0)."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"image {path} holds NaN or inf values: replace them (e.g. by 0) or remove the file")
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) / (hi - lo) * 255).astype(np.uint8)


def _wide(im: Image.Image, path: Path) -> tuple[np.ndarray, str | None]:
    """An integer image wider than 8 bits, or a float image -> (uint8 (H, W), note): see the module docstring."""
    if im.mode == "F":
        return _min_max(np.asarray(im), path), "float (min-max scaled)"
    a = np.asarray(im, dtype=np.int64)
    if a.size and a.min() < 0:
        return _min_max(a, path), "signed integers (min-max scaled)"
    declared = _png_sbit(path) if im.format == "PNG" else None
    bits = max(8, int(a.max()).bit_length() if a.size else 0, declared or 0)
    if bits == 8:
        return a.astype(np.uint8), None
    top = 2**bits - 1
    return np.rint(a * 255 / top).astype(np.uint8), f"{bits}-bit (scaled by 255/{top})"


def _grey_rgb(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_image(path) -> tuple[np.ndarray, str | None]:
    """(8-bit grey (H, W) uint8 array, note): the note says how a file that is not 8-bit grey was read
    (e.g. '12-bit (scaled by 255/4095)', 'DICOM (window)'), None for 8-bit grey."""
    path = Path(path)
    if looks_like_dicom(path):
        return read_dicom(path)
    with _opened(path) as im:
        if im.mode in ("L", "1"):
            return np.asarray(im.convert("L"), dtype=np.uint8).copy(), None
        if im.mode.startswith("I") or im.mode == "F":
            return _wide(im, path)
        bands = im.getbands()
        if im.mode in ("P", "PA"):
            note = "palette (converted to grey)"
        elif "A" in bands or "a" in bands:
            note = "with an alpha channel (dropped)"
        elif im.mode == "RGB" and _grey_rgb(np.asarray(im)):
            note = None  # grey stored as RGB
        else:
            note = "colour (converted to grey)"
        return np.asarray(im.convert("L"), dtype=np.uint8).copy(), note


def read_gray(path) -> np.ndarray:
    """An image file as an 8-bit grey (H, W) uint8 array, read as ``read_image`` says."""
    return read_image(path)[0]


def read_mask(path) -> tuple[np.ndarray, bool]:
    """(mask values (H, W) uint8, in colour): a colour mask's value is the largest of its channels
    (lungs drawn in red are 255, not grey 76), a transparent pixel is 0; wide data is scaled as images are."""
    path = Path(path)
    if looks_like_dicom(path):  # DICOM's masks (SEG objects) hold segments in frames, not a picture
        raise DataError(f"mask {path} is a DICOM file: save each mask as a PNG (0 background, 255 foreground)")
    with _opened(path) as im:
        if im.mode in ("L", "1"):
            return np.asarray(im.convert("L"), dtype=np.uint8).copy(), False
        if im.mode.startswith("I") or im.mode == "F":
            return _wide(im, path)[0], False
        rgba = np.asarray(im.convert("RGBA"))
        v = rgba[..., :3].max(axis=-1)
        v[rgba[..., 3] == 0] = 0
        return v, not _grey_rgb(rgba[..., :3])


def _values(values) -> str:
    shown = ", ".join(str(int(v)) for v in values[:8])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 8 else "")


def binarise_mask(m: np.ndarray, source="a mask") -> tuple[np.ndarray, str]:
    """(uint8 0/1 mask, convention) from the values the uint8 mask holds:
    'empty' (all 0); '0/1', '0/255' or '0/v' (one nonzero value: it is foreground);
    'graded' (several values, some above 127, i.e. an anti-aliased 0/255 mask: > 127).
    Several values and none above 127 (a label map such as 0/1/2, a faint drawing) is a DataError."""
    values = np.flatnonzero(np.bincount(m.ravel(), minlength=1))
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return np.zeros_like(m, dtype=np.uint8), "empty"
    if nonzero.size == 1:
        kind = {1: "0/1", 255: "0/255"}.get(int(nonzero[0]), "0/v")
        return (m > 0).astype(np.uint8), kind
    if nonzero[-1] > 127:
        return (m > 127).astype(np.uint8), "graded"
    raise DataError(
        f"{source} holds {len(values)} values ({_values(values)}), none above 127, so it is neither a "
        "0/255 nor a 0/1 mask (a label map?): save it with 0 for background and 255 (or 1) for foreground"
    )


def resize_gray(a: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if a.shape == (size, size):
        return a
    im = Image.fromarray(a).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class Decoded(NamedTuple):
    """One item decoded by ``decode_item``."""

    image: np.ndarray  # uint8 (size, size)
    mask: np.ndarray | None  # uint8 0/1 (size, size), None without a mask
    mask_kind: str  # binarise_mask's convention, "none" without a mask
    colour_mask: bool  # the mask was in colour (read by its largest channel)
    image_note: str | None  # read_image's note, None for 8-bit grey
    shape: tuple  # the original (H, W)


def decode_item(item: Item, size: int) -> Decoded:
    """The item's image and mask, read and binarised as the module docstring says, resized to size x size."""
    img, note = read_image(item.image)
    if item.mask is None:
        return Decoded(resize_gray(img, size), None, "none", False, note, img.shape)
    raw, colour = read_mask(item.mask)
    if raw.shape != img.shape:
        raise DataError(
            f"image {item.image} is {img.shape[1]}x{img.shape[0]} but its mask {item.mask} is "
            f"{raw.shape[1]}x{raw.shape[0]}: give them the same size"
        )
    m, kind = binarise_mask(raw, f"mask {item.mask}")
    return Decoded(resize_gray(img, size), resize_gray(m, size, nearest=True), kind, colour, note, img.shape)


MASK_RULES = {  # binarise_mask's conventions, as MaskStats.describe says them
    "0/255": "0/255 (binarised at >127)",
    "0/1": "0/1 (binarised at >0)",
    "0/v": "0/v, v not 1 or 255 (nonzero is foreground)",
    "graded": "graded, i.e. anti-aliased 0/255 (binarised at >127)",
    "empty": "empty",
}


@dataclass
class MaskStats:
    """What decoding found: how many masks had each convention (``MASK_RULES``), how many of them
    were in colour, and how the images that were not plain 8-bit grey were read."""

    counts: dict = field(default_factory=dict)  # convention -> masks
    colour: int = 0  # masks in colour, read by their largest channel
    images: dict = field(default_factory=dict)  # read_image's note -> images

    def all_empty(self) -> bool:
        """True when there were masks and every one of them was empty."""
        return bool(self.counts) and set(self.counts) == {"empty"}

    def describe(self) -> str:
        parts = [f"{self.counts[k]} {rule}" for k, rule in MASK_RULES.items() if self.counts.get(k)]
        text = "masks: " + (", ".join(parts) if parts else "none")
        if self.colour:
            text += f"; {self.colour} of them in colour (foreground where any channel is)"
        if self.images:
            text += "; images: " + ", ".join(f"{n} {note}" for note, n in sorted(self.images.items()))
        return text


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
            except OSError as e:
                raise DataError(f"cannot read {p} ({e.strerror or e}): check the data folder") from None
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def _meta_problem(meta, n: int, size: int, has_masks: bool) -> str | None:
    """What is wrong with a cache entry's JSON (written by load_arrays), or None."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for k, want in (("version", CACHE_VERSION), ("size", size), ("n", n), ("has_masks", has_masks)):
        if type(meta.get(k)) is not type(want) or meta[k] != want:
            return f"{k} is {meta.get(k)!r}, not {want!r}"

    def counts(v):
        return isinstance(v, dict) and all(isinstance(k, str) and type(c) is int for k, c in v.items())

    if not (counts(meta.get("mask_counts")) and counts(meta.get("image_counts"))
            and type(meta.get("colour_masks")) is int):
        return "its counts are not numbers"
    return None


def _read_cache(cache_dir: Path, key: str, n: int, size: int, has_masks: bool):
    """(images, masks, MaskStats) of the cache entry ``key``, or None when there is none or it is damaged
    (a damaged one is warned about, then rebuilt by load_arrays)."""
    meta_path = cache_dir / f"{key}.json"
    try:
        if not meta_path.is_file():
            return None
    except OSError:  # e.g. a folder name too long: writing the entry says so
        return None
    try:
        meta = json.loads(meta_path.read_text())
        problem = _meta_problem(meta, n, size, has_masks)
        if problem is None:
            images = np.load(cache_dir / f"{key}.images.npy", mmap_mode="r")
            masks = np.load(cache_dir / f"{key}.masks.npy", mmap_mode="r") if has_masks else None
            if any(a is not None and (a.shape != (n, size, size) or a.dtype != np.uint8) for a in (images, masks)):
                problem = f"arrays that are not uint8 ({n}, {size}, {size})"
            else:
                return images, masks, MaskStats(meta["mask_counts"], meta["colour_masks"], meta["image_counts"])
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
    warnings.warn(f"ignoring the damaged decoded-image cache entry {meta_path} ({problem}): decoding again",
                  MinunetWarning, stacklevel=1)
    return None


def load_arrays(items, size: int, cache_dir=None, workers: int = 2, progress=None) -> ArraySet:
    """Decode ``items`` into uint8 arrays, through the cache when ``cache_dir`` is given.

    The cache holds ``<key>.images.npy``, ``<key>.masks.npy`` and ``<key>.json``
    (written last, so a half-written entry is never used); the key is
    ``cache_key(items, size)``, so a changed file list, file, size or decoding
    rule (``CACHE_VERSION``) makes a new entry. An entry that is damaged (JSON
    of the wrong shape, arrays of the wrong shape) is decoded again, with a
    warning. ``progress(done, total)`` is called while decoding."""
    items = list(items)
    names, groups = [it.name for it in items], [it.group for it in items]
    has_masks = all(it.mask is not None for it in items)
    key = cache_key(items, size)
    if cache_dir:
        cache_dir = Path(cache_dir).expanduser()
        remove_stale_temporaries(cache_dir)  # partial entries of killed processes (atomicfile.py)
        hit = _read_cache(cache_dir, key, len(items), size, has_masks)
        if hit is not None:
            images, masks, stats = hit
            return ArraySet(images, masks, names, groups, stats, cached=True)

    n = len(items)
    images = np.empty((n, size, size), np.uint8)
    masks = np.empty((n, size, size), np.uint8) if has_masks else None
    stats = MaskStats()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes outside the GIL
        for i, d in enumerate(pool.map(lambda it: decode_item(it, size), items)):
            images[i] = d.image
            if masks is not None:
                masks[i] = d.mask
            stats.counts[d.mask_kind] = stats.counts.get(d.mask_kind, 0) + 1
            stats.colour += d.colour_mask
            if d.image_note is not None:
                stats.images[d.image_note] = stats.images.get(d.image_note, 0) + 1
            if progress is not None and (i % 64 == 0 or i == n - 1):
                progress(i + 1, n)

    if cache_dir:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for label, arr in (("images", images), ("masks", masks)):
                if arr is None:
                    continue
                atomic_write(cache_dir / f"{key}.{label}.npy", lambda f, arr=arr: np.save(f, arr), fsync=False)
            meta = {"version": CACHE_VERSION, "size": size, "n": n, "has_masks": has_masks,
                    "mask_counts": stats.counts, "colour_masks": stats.colour, "image_counts": stats.images}
            atomic_write(cache_dir / f"{key}.json", lambda f: f.write(json.dumps(meta).encode()), fsync=False)
        except OSError as e:  # an unwritable cache only costs time: the arrays are in memory
            # stacklevel=1 ties the warning to this line, not to the caller's, so Python's default filter
            # shows it once however often load_arrays is called (training calls it for train and val).
            warnings.warn(f"cannot write the decoded-image cache in {cache_dir} ({e.strerror or e}): going on "
                          "without it; pass --cache-dir with a writable folder, or --no-cache", MinunetWarning,
                          stacklevel=1)
    return ArraySet(images, masks, names, groups, stats, cached=False)
