"""Reading data right or refusing it: mask conventions, 16-bit and float images, --exclude with a split
file, unreadable folders and file names, damaged cache entries. Each test builds its bad input itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from minidata import make_generic, make_qu, save, xray
from PIL import Image
from test_cli import TINY, assert_one_line_error, run

from minunet.data import (
    binarise_mask,
    cache_key,
    decode,
    find_data,
    load_arrays,
    make_split,
    read_exclude,
    read_gray,
    read_mask,
)
from minunet.errors import DataError, MinunetWarning


def lungs(h=40, w=40, seed=0):
    """A 0/1 lung mask (two ellipses) and its X-ray."""
    img, m = xray(np.random.default_rng(seed), h, w)
    return img, (m > 0).astype(np.uint8)


def with_masks(root: Path, masks) -> list:
    """A generic data set at root whose masks are the given (H, W) or (H, W, C) uint8 arrays."""
    make_generic(root, n=len(masks))
    for i, m in enumerate(masks):
        save(root / "masks" / f"img {i}.png", m)
    return find_data(root).items()


# --- masks: the rule comes from what the file holds -------------------------------------------------


@pytest.mark.parametrize("value", [38, 76, 128, 200])
def test_a_mask_with_two_values_has_its_nonzero_value_as_foreground(value):
    _, fg = lungs()
    m, kind = binarise_mask(fg * np.uint8(value))
    assert np.array_equal(m, fg), value
    assert kind == "0/v"


def test_zero_one_zero_255_and_anti_aliased_masks_keep_their_rules():
    _, fg = lungs()
    assert binarise_mask(fg)[1] == "0/1" and np.array_equal(binarise_mask(fg)[0], fg)
    assert binarise_mask(fg * np.uint8(255))[1] == "0/255"
    graded = np.array([[0, 60, 128, 255]], np.uint8)  # anti-aliased 0/255: many values, some above 127
    m, kind = binarise_mask(graded)
    assert kind == "graded" and m.tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("values", [(0, 38, 75), (0, 1, 2)])
def test_a_mask_with_no_0_255_or_0_1_reading_is_refused_naming_the_file_and_values(tmp_path, values):
    _, fg = lungs()
    odd = np.zeros_like(fg)
    odd[:, 10:20], odd[:, 20:30] = values[1], values[2]  # anti-aliased edges, or a 3-label map
    items = with_masks(tmp_path / "d", [fg * 255, odd])
    with pytest.raises(DataError, match=r"img 1\.png holds 3 values \(" + ", ".join(map(str, values))):
        load_arrays(items, 32, cache_dir=None)
    r = run("train", tmp_path / "d", "--epochs", "1", "--val-fraction", "0.5", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, "img 1.png holds 3 values", "neither a 0/255 nor a 0/1 mask")


def test_colour_masks_count_where_any_channel_does_and_are_said_once(tmp_path):
    _, fg = lungs()
    red = np.zeros((*fg.shape, 3), np.uint8)
    red[..., 0] = fg * 255  # lungs drawn in red: grey 76 once converted
    blue = np.zeros((*fg.shape, 3), np.uint8)
    blue[..., 2] = fg * 200  # dark blue: grey 23
    items = with_masks(tmp_path / "d", [red, blue, fg * 255])
    arr = load_arrays(items, 40, cache_dir=None)
    for k in range(3):
        assert np.array_equal(arr.masks[k], fg), k
    assert arr.mask_stats.counts == {"0/255": 2, "0/v": 1} and arr.mask_stats.colour == 2
    text = arr.mask_stats.describe()
    assert "2 0/255" in text and "1 0/v" in text and "2 of them in colour" in text, text
    assert read_mask(items[0].mask)[1] and not read_mask(items[2].mask)[1]


def test_transparent_pixels_of_a_mask_are_background(tmp_path):
    _, fg = lungs()
    rgba = np.full((*fg.shape, 4), 255, np.uint8)  # white everywhere, opaque only on the lungs
    rgba[..., 3] = fg * 255
    items = with_masks(tmp_path / "d", [rgba])
    assert np.array_equal(load_arrays(items, 40, cache_dir=None).masks[0], fg)


def test_describe_reports_every_convention():
    from minunet.data import MaskStats

    text = MaskStats({"0/255": 3, "0/1": 2, "0/v": 1, "graded": 4, "empty": 5}, colour=1).describe()
    for part in ("3 0/255 (binarised at >127)", "2 0/1 (binarised at >0)", "1 0/v", "nonzero is foreground",
                 "4 graded", "5 empty", "1 of them in colour"):
        assert part in text, (part, text)


def test_a_lung_run_whose_masks_are_all_empty_is_refused(tmp_path):
    items = with_masks(tmp_path / "d", [np.zeros((40, 40), np.uint8)] * 6)
    assert all(it.mask is not None for it in items)
    r = run("train", tmp_path / "d", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, "empty", str(tmp_path / "d"))
    assert not (tmp_path / "run" / "last.npz").exists()


# --- images: scaled by their stored range -----------------------------------------------------------


def png16(path: Path, a: np.ndarray, sbit: int | None = None):
    """A 16-bit grey PNG of a, with an sBIT chunk declaring ``sbit`` significant bits when given."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if sbit is not None:
        info = PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint16)).save(path, pnginfo=info)
    assert Image.open(path).mode == "I;16"
    if sbit is not None:
        raw = path.read_bytes()
        assert b"sBIT" in raw[: raw.index(b"IDAT")]


def test_twelve_bit_data_in_a_16_bit_png_is_scaled_by_4095(tmp_path):
    a = np.linspace(0, 4095, 40 * 40).reshape(40, 40).round()
    png16(tmp_path / "x.png", a)
    g = read_gray(tmp_path / "x.png")
    assert g.dtype == np.uint8 and g.max() == 255 and g.min() == 0
    assert np.array_equal(g, np.rint(a * 255 / 4095).astype(np.uint8))


def test_a_declared_bit_depth_wins_over_the_values(tmp_path):
    a = np.linspace(0, 1000, 40 * 40).reshape(40, 40).round()  # a dark 12-bit image: 10 bits would do
    png16(tmp_path / "x.png", a, sbit=12)
    assert np.array_equal(read_gray(tmp_path / "x.png"), np.rint(a * 255 / 4095).astype(np.uint8))
    png16(tmp_path / "y.png", a)  # no declaration: the values' own range, 2**10 - 1
    assert np.array_equal(read_gray(tmp_path / "y.png"), np.rint(a * 255 / 1023).astype(np.uint8))


def test_full_16_bit_and_8_bit_values_in_16_bit_files(tmp_path):
    a = np.linspace(0, 65535, 40 * 40).reshape(40, 40).round()
    png16(tmp_path / "x.png", a)
    assert np.array_equal(read_gray(tmp_path / "x.png"), np.rint(a * 255 / 65535).astype(np.uint8))
    b = np.linspace(0, 200, 40 * 40).reshape(40, 40).round()
    png16(tmp_path / "y.png", b)
    assert np.array_equal(read_gray(tmp_path / "y.png"), b.astype(np.uint8))


def test_a_float_tiff_is_min_max_scaled(tmp_path):
    a = np.linspace(-0.5, 1.5, 40 * 40, dtype=np.float32).reshape(40, 40)
    Image.fromarray(a).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "F"
    g = read_gray(tmp_path / "x.tif")
    assert g.min() == 0 and g.max() == 255
    assert np.array_equal(g, np.rint((a.astype(np.float64) + 0.5) / 2 * 255).astype(np.uint8))
    a[3, 3] = np.nan
    Image.fromarray(a).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif.*NaN or inf"):
        read_gray(tmp_path / "nan.tif")


def test_unusual_images_are_converted_and_said_once(tmp_path):
    make_generic(tmp_path / "d", n=5)
    img = np.asarray(Image.open(tmp_path / "d" / "images" / "img 0.png"))
    Image.fromarray(np.stack([img, img, img, np.full_like(img, 255)], 2)).save(tmp_path / "d/images/img 0.png")
    Image.fromarray(img).convert("P").save(tmp_path / "d" / "images" / "img 1.png")
    png16(tmp_path / "d" / "images" / "img 2.png", img.astype(np.float64) * 4095 / 255)
    arr = load_arrays(find_data(tmp_path / "d").items(), 40, cache_dir=None)
    assert np.array_equal(arr.images[0], img)
    assert arr.mask_stats.images == {"with an alpha channel (dropped)": 1, "palette (converted to grey)": 1,
                                     "12-bit (scaled by 255/4095)": 1}
    text = arr.mask_stats.describe()
    assert text.endswith("; images: 1 12-bit (scaled by 255/4095), 1 palette (converted to grey), "
                         "1 with an alpha channel (dropped)"), text


def test_cache_entries_of_the_old_decoding_rules_are_not_served(tmp_path, monkeypatch):
    make_generic(tmp_path / "d", n=2)
    items = find_data(tmp_path / "d").items()
    key = cache_key(items, 32)
    monkeypatch.setattr(decode, "CACHE_VERSION", 1)  # images and masks decoded before 16-bit scaling and mask rules
    assert cache_key(items, 32) != key


# --- --exclude with a split file ---------------------------------------------------------------------


def test_exclude_reads_the_held_out_lists_of_a_split_file(tmp_path):
    make_qu(tmp_path / "data", n_per_class=4)
    idx = find_data(tmp_path / "data")
    run_split = make_split(idx, 0.25).to_json(idx)
    (tmp_path / "split.json").write_text(json.dumps(run_split))
    assert read_exclude(tmp_path / "split.json") == set(run_split["val"])
    (tmp_path / "renamed.txt").write_text(json.dumps(run_split, indent=1))  # a split file, whatever its name
    assert read_exclude(tmp_path / "renamed.txt") == set(run_split["val"])
    (tmp_path / "three.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    assert read_exclude(tmp_path / "three.json") == {"b", "c"}
    (tmp_path / "names.txt").write_text("# a list\nNormal/x.png\n")
    assert read_exclude(tmp_path / "names.txt") == {"Normal/x.png"}
    (tmp_path / "train_only.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(DataError, match="no val or test list"):
        read_exclude(tmp_path / "train_only.json")


def test_train_exclude_given_a_runs_split_json_keeps_its_val_images_out(tmp_path):
    make_qu(tmp_path / "data", n_per_class=4)
    idx = find_data(tmp_path / "data")
    first = make_split(idx, 0.25, seed=5).to_json(idx)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "split.json").write_text(json.dumps(first))
    r = run("train", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "new", "--exclude",
            tmp_path / "old" / "split.json", *TINY)
    assert r.exit_code == 0, r.output
    new = json.loads((tmp_path / "new" / "split.json").read_text())
    assert new["excluded"] == len(first["val"]) == 3
    assert not set(first["val"]) & set(new["train"] + new["val"])
    r = run("train", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "bad", "--exclude",
            tmp_path / "old" / "config.json", *TINY)
    assert_one_line_error(r, "config.json")


# --- folders, file names and the cache: one line, exit 2 (or a warning for the cache) -----------------


def test_an_unreadable_images_folder_is_one_line(tmp_path, monkeypatch):
    make_generic(tmp_path / "d", n=3)
    iterdir = Path.iterdir

    def denied(self):
        if self.name == "images":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(DataError, match="cannot read the folder .*images .*Permission denied"):
        find_data(tmp_path / "d")
    r = run("train", tmp_path / "d", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, "Permission denied", "images")


def test_an_images_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "images").write_text("not a folder")
    (tmp_path / "d" / "masks").mkdir()
    r = run("train", tmp_path / "d", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, str(tmp_path / "d"))


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path):
    make_generic(tmp_path / "d", n=3)
    for sub in ("images", "masks"):
        bad = os.fsencode(tmp_path / "d" / sub) + b"/bad\xff.png"
        shutil.copyfile(tmp_path / "d" / sub / "img 0.png", os.fsdecode(bad))
    with pytest.raises(DataError, match="not valid UTF-8"):
        find_data(tmp_path / "d")
    r = run("train", tmp_path / "d", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, "bad\\xff.png", "not valid UTF-8")


def test_a_path_too_long_for_the_filesystem_is_one_line(tmp_path):
    long = tmp_path / ("x" * 300)
    r = run("train", long, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(r, "too long")
    items = find_data(make_generic(tmp_path / "d", n=2)).items()
    with pytest.warns(MinunetWarning, match="too long"):  # the cache only costs time: going on without it
        arr = load_arrays(items, 32, tmp_path / ("c" * 300))
    assert np.array_equal(arr.images, load_arrays(items, 32, None).images)


@pytest.mark.parametrize("damage", [
    lambda m: [m],  # a list, not an object
    lambda m: "text",
    lambda m: {**m, "mask_counts": [3]},
    lambda m: {**m, "has_masks": "yes"},
    lambda m: {**m, "n": "2"},
    lambda m: {**m, "image_counts": {"12-bit": "one"}},
])
def test_a_damaged_cache_entry_is_decoded_again_with_a_warning(tmp_path, damage):
    make_generic(tmp_path / "d", n=2)
    items, cache = find_data(tmp_path / "d").items(), tmp_path / "cache"
    first = load_arrays(items, 32, cache)
    meta_path = cache / f"{cache_key(items, 32)}.json"
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    with pytest.warns(MinunetWarning, match=f"damaged.*{meta_path.name}.*decoding again"):
        again = load_arrays(items, 32, cache)
    assert not again.cached and np.array_equal(again.images, first.images)
    assert np.array_equal(again.masks, first.masks) and again.mask_stats == first.mask_stats
    assert load_arrays(items, 32, cache).cached  # rewritten


def test_a_cache_entry_with_arrays_of_the_wrong_shape_is_decoded_again(tmp_path):
    make_generic(tmp_path / "d", n=2)
    items, cache = find_data(tmp_path / "d").items(), tmp_path / "cache"
    first = load_arrays(items, 32, cache)
    np.save(cache / f"{cache_key(items, 32)}.masks.npy", np.zeros((1, 32, 32), np.uint8))
    with pytest.warns(MinunetWarning, match="damaged"):
        again = load_arrays(items, 32, cache)
    assert not again.cached and np.array_equal(again.masks, first.masks)
