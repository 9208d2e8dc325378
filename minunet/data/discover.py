"""Finding the data: which layout a folder has, and every image with its mask, split by split.

Two layouts are detected (``find_data``):

- COVID-QU-Ex: ``Lung Segmentation Data`` / ``Infection Segmentation Data``, then
  ``Train|Val|Test``, then one folder per class (``COVID-19``, ``Non-COVID``,
  ``Normal``), each with ``images/``, ``lung masks/`` and (infection part)
  ``infection masks/``. DATA may point at the top folder, at one part, at one
  split or at one class folder.
- generic: ``ROOT/images/*`` with ``ROOT/masks/<same name>`` (or the same stem
  with another extension, or ``<stem>_mask``), optionally under ``train/ val/ test/``.

Folder names are matched ignoring case (``subdir``). A folder that cannot be
listed, a path the filesystem refuses (e.g. too long) and an image whose file
name is not valid UTF-8 are DataErrors naming the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minunet.data.dicom import looks_like_dicom
from minunet.errors import DataError

QU_PARTS = ("Lung Segmentation Data", "Infection Segmentation Data")
MASK_KINDS = ("lung", "infection")
QU_MASK_DIRS = {"lung": "lung masks", "infection": "infection masks"}
QU_CLASSES = ("covid-19", "non-covid", "normal")  # lower case: folder names are matched ignoring case
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


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


def _shown(p) -> str:
    """A path as it can be printed: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _check_utf8(p: Path) -> Path:
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"the name of {_shown(p)} is not valid UTF-8: rename it (or move it out of the data)") from None
    return p


def _entries(d: Path, keep) -> list[Path]:
    """The entries p of folder d for which keep(p) holds; a folder that cannot be read is a DataError."""
    try:
        return [p for p in d.iterdir() if keep(p)]
    except OSError as e:
        raise DataError(f"cannot read the folder {_shown(d)} ({e.strerror or e}): check that it is a folder "
                        "you may read") from None


def is_image(p: Path) -> bool:
    """A visible file with an image extension (IMAGE_EXTS, any case), or a DICOM file without one
    (``dicom.looks_like_dicom``: the preamble is read only of files with no or a numeric extension)."""
    if p.name.startswith(".") or not p.is_file():
        return False
    return p.suffix.lower() in IMAGE_EXTS or looks_like_dicom(p)


def list_images(d: Path) -> list[Path]:
    """The images directly in folder d, sorted by name (DataError for a name that is not UTF-8)."""
    return sorted((_check_utf8(p) for p in _entries(d, is_image)), key=lambda p: p.name)


def subdir(d: Path, name: str) -> Path | None:
    """The child folder of d named ``name``, ignoring case, or None."""
    if not d.is_dir():
        return None
    exact = d / name
    if exact.is_dir():
        return exact
    found = _entries(d, lambda c: c.is_dir() and c.name.lower() == name.lower())
    return found[0] if found else None


def _is_qu_class(d: Path, masks_optional: bool = False) -> bool:
    """images/ with a mask folder beside it; or, when masks are optional (predict, evaluate), images/ in a
    folder named as a COVID-QU-Ex class: the official Test split has no mask folders."""
    if subdir(d, "images") is None:
        return False
    return any(subdir(d, m) for m in QU_MASK_DIRS.values()) or (masks_optional and d.name.lower() in QU_CLASSES)


def _qu_classes(d: Path, masks_optional: bool = False) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted((_check_utf8(c) for c in _entries(d, lambda c: c.is_dir() and _is_qu_class(c, masks_optional))),
                  key=lambda c: c.name)


def _qu_split_dirs(d: Path, masks_optional: bool = False) -> dict:
    out = {}
    for s in SPLITS:
        sd = subdir(d, s)
        if sd is not None and _qu_classes(sd, masks_optional):
            out[s] = sd
    return out


def _scan_qu_class(cdir: Path, mask: str, root: Path, require_masks: bool) -> list[Item]:
    images_dir = subdir(cdir, "images")
    mask_dir = subdir(cdir, QU_MASK_DIRS[mask])
    if mask_dir is None and require_masks:
        other = [m for m in MASK_KINDS if m != mask and subdir(cdir, QU_MASK_DIRS[m])]
        hint = f"use --mask {other[0]}" if other else "check the folder"
        if mask == "infection":
            hint += " or point at the 'Infection Segmentation Data' folder"
        raise DataError(f"no '{QU_MASK_DIRS[mask]}' folder in {cdir}: {hint}")
    items = []
    for img in list_images(images_dir):
        m = mask_dir / img.name if mask_dir is not None else None
        if m is not None and not m.is_file():
            if require_masks:
                raise DataError(f"image {img} has no mask {m}: add the mask or remove the image")
            m = None
        items.append(Item(img, m, cdir.name, img.relative_to(root).as_posix()))
    return items


def _scan_generic(d: Path, root: Path, require_masks: bool) -> list[Item]:
    images_dir, masks_dir = subdir(d, "images"), subdir(d, "masks")
    if masks_dir is None and require_masks:
        raise DataError(
            f"{d} has images/ but no masks/ folder: put each image's mask in {d / 'masks'} under the same name"
        )
    masks = {}
    if masks_dir is not None:
        for p in list_images(masks_dir):
            masks.setdefault(p.name, p)
            masks.setdefault(p.stem, p)
            if p.stem.endswith("_mask"):
                masks.setdefault(p.stem[: -len("_mask")], p)
    items = []
    for img in list_images(images_dir):
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
    root = _check_utf8(Path(root).expanduser())
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except OSError as e:  # e.g. a name too long for the filesystem
        raise DataError(f"cannot read the data folder {root} ({e.strerror or e}): check the path") from None
    if not exists:
        raise DataError(f"data folder {root} does not exist: pass the folder that holds the images and masks")
    if not is_dir:
        raise DataError(f"{root} is not a folder: pass the folder that holds images/ and masks/ (or COVID-QU-Ex data)")
    root = root.resolve()

    # COVID-QU-Ex, from the top down to one class folder.
    part = root
    present = [p for p in QU_PARTS if subdir(root, p)]
    if present:
        wanted = [p for p in (QU_PARTS if mask == "lung" else QU_PARTS[1:]) if p in present]
        if not wanted:
            raise DataError(f"{root} has no '{QU_PARTS[1]}' folder, which --mask infection needs: use --mask lung")
        part = subdir(root, wanted[0])
    splits = {}
    optional = not require_masks
    split_dirs = _qu_split_dirs(part, optional)
    if split_dirs:
        for s, sd in split_dirs.items():
            splits[s] = [it for c in _qu_classes(sd, optional) for it in _scan_qu_class(c, mask, root, require_masks)]
    elif _qu_classes(root, optional):
        splits["all"] = [it for c in _qu_classes(root, optional) for it in _scan_qu_class(c, mask, root, require_masks)]
    elif _is_qu_class(root, optional):
        splits["all"] = _scan_qu_class(root, mask, root.parent, require_masks)
    if splits:
        layout = "covid-qu-ex"
    else:
        layout = "generic"
        if subdir(root, "images") is not None:
            splits["all"] = _scan_generic(root, root, require_masks)
        else:
            for s in SPLITS:
                sd = subdir(root, s)
                if sd is not None and subdir(sd, "images") is not None:
                    splits[s] = _scan_generic(sd, root, require_masks)
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        loose = _entries(root, is_image)
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
