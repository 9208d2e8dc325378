"""Decoding: image files to uint8 arrays, once, through an on-disk cache.

Pixels: images become 8-bit grayscale (RGB converted), masks are binarised
(> 127 for 0/255 masks, > 0 for 0/1 masks: ``MaskStats`` says which were
found), both are resized to ``size`` x ``size`` (bilinear for images, nearest
for masks) and kept as uint8 (N, size, size) arrays (``ArraySet``), memory-mapped
from the cache on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from minunet.atomicfile import atomic_write, remove_stale_temporaries
from minunet.data.discover import Item
from minunet.errors import DataError, MinunetWarning

CACHE_VERSION = 1


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
        remove_stale_temporaries(cache_dir)  # partial entries of killed processes (atomicfile.py)
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
                atomic_write(cache_dir / f"{key}.{label}.npy", lambda f, arr=arr: np.save(f, arr), fsync=False)
            meta = {"version": CACHE_VERSION, "size": size, "n": n, "has_masks": has_masks, "mask_counts": counts}
            atomic_write(cache_dir / f"{key}.json", lambda f: f.write(json.dumps(meta).encode()), fsync=False)
        except OSError as e:  # an unwritable cache only costs time: the arrays are in memory
            # stacklevel=1 ties the warning to this line, not to the caller's, so Python's default filter
            # shows it once however often load_arrays is called (training calls it for train and val).
            warnings.warn(f"cannot write the decoded-image cache in {cache_dir} ({e.strerror or e}): going on "
                          "without it; pass --cache-dir with a writable folder, or --no-cache", MinunetWarning,
                          stacklevel=1)
    return ArraySet(images, masks, names, groups, stats, cached=False)
