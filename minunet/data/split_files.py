"""Split files: named lists of images (train, val, test) that runs and scores share.

A split file is JSON with any of the lists ``train``, ``val`` and ``test``;
each entry names one image by a tail of its path (``COVID-19/covid_1.png``,
i.e. class folder and file name, or the full path relative to the data
root, as a run's ``split.json`` writes it). Two kinds exist:

- a run's ``split.json`` (``train`` and ``val``), written by ``minunet train``;
- the committed COVID-QU-Ex split, ``minunet/assets/splits/covid-qu-ex.json``
  (name: ``covid-qu-ex``), which every shipped model uses: ``val`` chooses
  ``best.npz`` and the recipe, ``test`` is scored once at the end.

``train --exclude`` takes a text list of names or a split file; of a split
file it keeps out the held-out lists, ``val`` and ``test`` (of a run's
``split.json``: its val images), never ``train`` (``read_exclude``).

The committed split is per image, not per patient: COVID-QU-Ex does not
identify patients, so two images of one patient may fall on both sides.

How it was made (``build_fixed_split``, rebuilt by a test): the Train split of
"Infection Segmentation Data" (3,728 images) minus the 150 images of the
shipped sample; ``test`` is ``make_split``'s seeded 10% per class with seed 0
(exactly the images the first shipped lung model held out, so that model is
scored on images it never saw); ``val`` is a further seeded 1/9 per class of
the rest with seed 1 (about as many images as ``test``); ``train`` is the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from minunet.data.discover import DataIndex, Item
from minunet.data.split import Split, make_split, name_matches, read_name_list
from minunet.errors import ConfigError, DataError

SPLITS_DIR = Path(__file__).resolve().parent.parent / "assets" / "splits"
NAMED = {"covid-qu-ex": SPLITS_DIR / "covid-qu-ex.json"}
PARTS = ("train", "val", "test")


def resolve_split_path(name_or_path) -> Path:
    """A shipped split's name (``covid-qu-ex``) or a path -> the file's path."""
    return NAMED.get(str(name_or_path), Path(name_or_path).expanduser())


def read_split(name_or_path) -> dict:
    """The lists of a split file: {part: [names]} for the parts it has (at least one)."""
    path = resolve_split_path(name_or_path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read the split file {path}: {e.strerror or e}") from None
    except ValueError:
        raise DataError(f"{path} is not JSON: pass a split file (train/val/test lists) or a run's split.json") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path} holds no train/val/test lists: pass a split file or a run's split.json")
    parts = {}
    for p in PARTS:
        v = doc.get(p)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise DataError(f"{path}: '{p}' must be a list of image names")
        parts[p] = v
    if not parts:
        raise DataError(f"{path} holds no train/val/test lists: pass a split file or a run's split.json")
    return parts


def read_exclude(name_or_path) -> set:
    """The names ``train --exclude`` keeps out: every name of a text list, or the held-out lists
    (val and test) of a split file (a shipped split's name, a .json file, or a file holding a JSON object)."""
    path = resolve_split_path(name_or_path)
    if str(name_or_path) not in NAMED and path.suffix.lower() != ".json":
        try:
            with open(path, "rb") as f:
                is_json = f.read(4096).lstrip().startswith(b"{")
        except OSError as e:
            raise DataError(f"cannot read the --exclude list {path}: {e.strerror or e}") from None
        if not is_json:
            return read_name_list(path)
    parts = read_split(name_or_path)
    if not ("val" in parts or "test" in parts):
        raise DataError(f"--exclude {path} has no val or test list, so it names no held-out images: pass a run's "
                        "split.json, a split file with a val or test list, or a text list of names")
    return {n for p in ("val", "test") for n in parts.get(p, ())}


def select(items, names, source="the split file") -> list:
    """The items named in ``names`` (in the items' order); DataError when none is there."""
    names = set(names)
    kept = [it for it in items if name_matches(it, names)]
    if not kept and names:
        raise DataError(f"none of the images in {source} are in this data folder: check DATA")
    return kept


def split_from_file(index: DataIndex, split_file, exclude=None) -> Split:
    """The training and validation items named by a split file's train and val lists (train --split-file)."""
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


def build_fixed_split(index: DataIndex, exclude: set, seed: int = 0) -> dict:
    """The committed split of ``index`` (see the module docstring): {train, val, test} name lists."""
    first = make_split(index, 0.1, seed, None, exclude)
    rest = DataIndex(index.root, index.layout, index.mask, {"all": first.train})
    second = make_split(rest, 1 / 9, seed + 1)

    def names(items):
        return [f"{it.group}/{it.name.rsplit('/', 1)[-1]}" for it in items]

    return {"train": names(second.train), "val": names(second.val), "test": names(first.val)}


def index_from_names(names) -> DataIndex:
    """A COVID-QU-Ex index holding just these ``class/file`` names, in find_data's order (class, then file)."""
    items = sorted((Item(Path(n), None, n.split("/")[0], n) for n in names),
                   key=lambda it: (it.group, it.name.split("/")[-1]))
    return DataIndex(Path("."), "covid-qu-ex", "infection", {"train": items})


def filter_items(items, only, subset=None):
    """(items named in ``only``, which list), for evaluate --only, quantify --only and the benchmarks: a
    text list of names, or a split file (JSON: a run's split.json or a committed split such as
    covid-qu-ex) whose ``subset`` list is used (default: test when the file has one, else val)."""
    path = resolve_split_path(only)
    if only in NAMED or path.suffix == ".json":
        parts = read_split(only)
        subset = subset or ("test" if "test" in parts else "val")
        if subset not in parts:
            raise DataError(f"{path} has no {subset} list (it has: {', '.join(parts)}): choose another --subset")
        names, label = set(parts[subset]), f"{subset} of {path.name}"
    else:
        if subset:
            raise DataError(f"--subset needs a split file (JSON), but {path} is a text list of names")
        names, label = read_name_list(path), Path(only).name
    kept = [it for it in items if name_matches(it, names)]
    if not kept:  # DATA points below the run's data root: match the tails of the listed names
        tails = {"/".join(n.split("/")[i:]) for n in names for i in range(len(n.split("/")))}
        kept = [it for it in items if name_matches(it, tails)]
    if not kept:
        raise DataError(f"none of the images in {path} are in this data folder: check DATA and --only")
    return kept, label
