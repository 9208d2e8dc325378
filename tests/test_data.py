"""Data: layout detection, splits, decoding, the cache and reproducible batches."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from minidata import CLASSES, make_generic, make_qu, save, xray
from PIL import Image

from minunet.data import (
    Augment,
    BatchLoader,
    binarise_mask,
    cache_key,
    epoch_order,
    find_data,
    list_images,
    load_arrays,
    make_split,
    read_gray,
    read_name_list,
    subdir,
)
from minunet.data.batches import make_batch, repeat_severe, whiten_lesion
from minunet.errors import DataError, MinunetWarning

SAMPLE = Path(__file__).resolve().parent.parent / "minunet" / "assets" / "sample"


def test_qu_layout_found_from_every_level(tmp_path):
    part = make_qu(tmp_path, n_per_class=3, splits=("Train", "Test"))
    top = find_data(tmp_path, "lung")
    assert top.layout == "covid-qu-ex" and set(top.splits) == {"train", "test"}
    assert len(top.items("train")) == 9 and {it.group for it in top.items("train")} == set(CLASSES)
    it = top.items("train")[0]
    assert it.mask.parent.name == "lung masks" and it.mask.name == it.image.name and "(" in it.image.name
    assert find_data(part, "infection").items("test")[0].mask.parent.name == "infection masks"
    assert len(find_data(part / "Train", "lung").items("all")) == 9  # one split
    one = find_data(part / "Train" / "Normal", "lung")  # one class
    assert len(one.items()) == 3 and one.items()[0].group == "Normal"


def test_generic_layout_with_and_without_splits(tmp_path):
    make_generic(tmp_path / "flat", n=4, mask_suffix="_mask")
    idx = find_data(tmp_path / "flat")
    assert idx.layout == "generic" and list(idx.splits) == ["all"] and idx.items()[0].mask.name == "img 0_mask.png"
    make_generic(tmp_path / "split" / "train", n=4)
    make_generic(tmp_path / "split" / "val", n=2)
    idx = find_data(tmp_path / "split")
    assert set(idx.splits) == {"train", "val"}
    sp = make_split(idx)
    assert sp.source == "dataset val split" and len(sp.train) == 4 and len(sp.val) == 2


def test_folder_helpers_ignore_case_and_skip_what_is_not_an_image(tmp_path):
    (tmp_path / "Images").mkdir()
    for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / "Images" / name).write_bytes(b"")
    (tmp_path / "Images" / "sub.png").mkdir()
    assert subdir(tmp_path, "images") == tmp_path / "Images" and subdir(tmp_path, "masks") is None
    assert subdir(tmp_path / "none", "images") is None
    assert [p.name for p in list_images(subdir(tmp_path, "IMAGES"))] == ["a.jpg", "b.PNG"]


def test_val_fraction_split_is_seeded_stratified_and_disjoint(tmp_path):
    make_qu(tmp_path, n_per_class=10)
    idx = find_data(tmp_path)
    a, b, c = make_split(idx, 0.2, seed=1), make_split(idx, 0.2, seed=1), make_split(idx, 0.2, seed=2)
    assert [i.name for i in a.val] == [i.name for i in b.val] != [i.name for i in c.val]
    assert len(a.val) == 6 and sorted(i.group for i in a.val) == sorted(CLASSES * 2)
    assert not {i.name for i in a.val} & {i.name for i in a.train} and len(a.train) + len(a.val) == 30
    assert "seeded" in a.source
    limited = make_split(idx, 0.2, seed=1, limit=12)
    assert len(limited.train) + len(limited.val) == 12


def test_exclude_list_drops_listed_images(tmp_path):
    make_qu(tmp_path, n_per_class=4)
    idx = find_data(tmp_path)
    victim = idx.items("train")[0]
    lst = tmp_path / "ex.txt"
    lst.write_text(f"# held out\n{victim.image.name}\n")
    sp = make_split(idx, 0.25, exclude=read_name_list(lst))
    assert sp.excluded == 1 and victim.name not in {i.name for i in sp.train + sp.val}


def test_mask_conventions_are_detected():
    m, kind = binarise_mask(np.array([[0, 1], [1, 0]], np.uint8))
    assert kind == "0/1" and m.tolist() == [[0, 1], [1, 0]]
    m, kind = binarise_mask(np.array([[0, 128], [127, 255]], np.uint8))  # anti-aliased 0/255
    assert kind == "graded" and m.tolist() == [[0, 1], [0, 1]]
    m, kind = binarise_mask(np.array([[0, 255], [255, 0]], np.uint8))
    assert kind == "0/255" and m.tolist() == [[0, 1], [1, 0]]
    assert binarise_mask(np.zeros((2, 2), np.uint8))[1] == "empty"


def test_rgb_image_is_converted_and_zero_one_masks_read(tmp_path):
    make_generic(tmp_path, n=3, zero_one=True)
    rgb = np.stack([np.full((40, 40), 10, np.uint8), np.full((40, 40), 200, np.uint8), np.zeros((40, 40), np.uint8)], 2)
    Image.fromarray(rgb).save(tmp_path / "images" / "img 0.png")
    assert read_gray(tmp_path / "images" / "img 0.png").shape == (40, 40)
    arr = load_arrays(find_data(tmp_path).items(), 32, cache_dir=None)
    assert arr.images.shape == (3, 32, 32) and arr.images.dtype == np.uint8
    assert set(np.unique(arr.masks)) <= {0, 1} and arr.masks.sum() > 0
    assert arr.mask_stats.counts == {"0/1": 3} and ">0" in arr.mask_stats.describe()


def test_cache_is_reused_and_keyed_by_files(tmp_path):
    make_generic(tmp_path / "d", n=4)
    items = find_data(tmp_path / "d").items()
    first = load_arrays(items, 32, tmp_path / "cache")
    second = load_arrays(items, 32, tmp_path / "cache")
    assert not first.cached and second.cached
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)
    assert cache_key(items, 32) != cache_key(items, 64) != cache_key(items[:3], 64)
    img, m = xray(np.random.default_rng(9))
    save(items[0].image, 255 - img)  # a changed file makes a new entry
    assert not load_arrays(items, 32, tmp_path / "cache").cached



def test_unwritable_cache_warns_once_and_decodes_anyway(tmp_path):
    make_generic(tmp_path / "d", n=4)
    items = find_data(tmp_path / "d").items()
    (tmp_path / "file").write_text("a file, not a folder")
    cache = tmp_path / "file" / "cache"  # cannot be created, even by root (chmod would not stop root)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own filter for user warnings: each message once
        first = load_arrays(items, 32, cache)
        second = load_arrays(items, 32, cache)
    assert not first.cached and not second.cached
    assert np.array_equal(first.images, load_arrays(items, 32, None).images)
    msgs = [str(w.message) for w in seen if issubclass(w.category, MinunetWarning)]
    assert len(msgs) == 1 and str(cache) in msgs[0] and "--no-cache" in msgs[0], msgs

@pytest.mark.parametrize("problem", ["missing", "empty", "no_mask", "corrupt", "size", "loose", "no_infection"])
def test_bad_data_raises_a_clear_error(tmp_path, problem):
    root = tmp_path / "d"
    if problem == "missing":
        pattern = "does not exist"
    elif problem == "empty":
        root.mkdir()
        pattern = "no images found"
    elif problem == "loose":
        save(root / "a.png", np.zeros((8, 8), np.uint8))
        pattern = "no images/ and masks/"
    elif problem == "no_infection":
        part = make_qu(root, n_per_class=1, infection=False)
        root = part / "Train"
        pattern = "no 'infection masks' folder"
    else:
        make_generic(root, n=2)
        if problem == "no_mask":
            (root / "masks" / "img 1.png").unlink()
            pattern = "img 1.png has no mask"
        elif problem == "corrupt":
            (root / "images" / "img 1.png").write_bytes(b"not a png at all")
            pattern = "cannot read image .*img 1.png"
        else:
            save(root / "masks" / "img 1.png", np.zeros((30, 40), np.uint8))
            pattern = "img 1.png is 40x40 but its mask"
    with pytest.raises(DataError, match=pattern):
        idx = find_data(root, "infection" if problem == "no_infection" else "lung")
        load_arrays(idx.items(), 32, cache_dir=None)


def test_epoch_order_and_batches_are_reproducible_and_skippable(tmp_path):
    make_generic(tmp_path, n=7)
    arr = load_arrays(find_data(tmp_path).items(), 32, cache_dir=None)
    assert sorted(epoch_order(7, 3, 1)) == list(range(7))
    assert not np.array_equal(epoch_order(7, 3, 1), epoch_order(7, 3, 2))
    for augment in (None, Augment()):
        full = list(BatchLoader(arr, 3, seed=3, epoch=1, augment=augment))
        again = list(BatchLoader(arr, 3, seed=3, epoch=1, augment=augment))
        tail = list(BatchLoader(arr, 3, seed=3, epoch=1, start=1, augment=augment))
        assert [b for b, _, _, _ in full] == [0, 1, 2] and full[-1][1].shape == (1, 1, 32, 32)
        assert all(w is None for _, _, _, w in full)  # no lesion weight: no pixel weights
        for (b1, x1, y1, _), (b2, x2, y2, _) in zip(full, again, strict=True):
            assert b1 == b2 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
        for (b1, x1, y1, _), (b2, x2, y2, _) in zip(full[1:], tail, strict=True):
            assert b1 == b2 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    plain = list(BatchLoader(arr, 7, seed=3, epoch=1))[0]
    aug = list(BatchLoader(arr, 7, seed=3, epoch=1, augment=Augment()))[0]
    assert plain[1].dtype == np.float32 and 0 <= plain[1].min() and plain[1].max() <= 1
    assert not np.array_equal(plain[1], aug[1]) and set(np.unique(aug[2])) <= {0.0, 1.0}
    order = epoch_order(7, 3, 1)
    assert np.array_equal(plain[1][:, 0], arr.images[order] / np.float32(255))


def test_lesion_whitening_brightens_only_the_lesion_and_keeps_the_other_draws():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 120).astype(np.uint8)  # a dark (aerated) lung everywhere
    img[0, :8] = 250  # a few bright pixels set the soft-tissue target (the 80th percentile stays dark here)
    img[:, 48:] = 220  # a bright band: the 80th percentile is 220
    img[30, 20] = 250  # a bone-white pixel inside the lesion, brighter than the target: kept, not darkened
    lesion = np.zeros((64, 64), np.uint8)
    lesion[20:40, 10:30] = 1
    out = whiten_lesion(img, lesion, np.random.default_rng(1), p=1.0)
    far = np.ones((64, 64), bool)
    far[4:56, 0:46] = False  # more than 2.5 blur sigmas (4 px at 256, 1 px here) from the lesion
    assert np.array_equal(out[far], img[far])  # nothing changes away from the lesion
    assert (out.astype(int) >= img.astype(int)).all()  # only brightens
    inside = out[25:35, 15:25].astype(float) - img[25:35, 15:25]
    assert inside.mean() > 0.3 * (220 - img[25:35, 15:25].mean()) - 1  # a >= 0.3 of the way to the target
    assert np.array_equal(whiten_lesion(img, lesion, np.random.default_rng(1), p=0.0), img)  # p = 0: never
    assert np.array_equal(whiten_lesion(img, np.zeros_like(lesion), np.random.default_rng(1), p=1.0), img)
    # The whitening draws come after the others: the rotation and intensity draws are those of a run without it,
    # so pixels the (rotated) lesion cannot reach are the same with and without it.
    mask = np.ones((64, 64), np.uint8)
    plain, m0 = Augment().apply(img, mask, np.random.default_rng(5))
    empty, m1 = Augment(whiten=1.0).apply(img, mask, np.random.default_rng(5), np.zeros_like(lesion))
    white, m2 = Augment(whiten=1.0).apply(img, mask, np.random.default_rng(5), lesion)
    assert np.array_equal(plain, empty) and np.array_equal(m0, m1) and np.array_equal(m0, m2)
    assert (white >= plain).all() and (white > plain).sum() > 200  # the lung mask is kept, the lesion whitened


def test_lesion_weights_follow_the_augmentation_and_leave_the_batch_unchanged(tmp_path):
    make_generic(tmp_path, n=5)
    arr = load_arrays(find_data(tmp_path).items(), 32, cache_dir=None)
    lesions = np.zeros((5, 32, 32), np.uint8)
    lesions[:, 8:20, 4:14] = 1  # a block off the centre: a rotation or a shift moves it
    lesions[3] = 0  # an image with no lesion: weights all 1
    for augment in (None, Augment()):
        plain = list(BatchLoader(arr, 5, seed=2, epoch=0, augment=augment, lesions=lesions))[0]
        weighted = list(BatchLoader(arr, 5, seed=2, epoch=0, augment=augment, lesions=lesions, lesion_weight=4.0))[0]
        # the same images, masks and draws: only the weights are added
        assert np.array_equal(plain[1], weighted[1]) and np.array_equal(plain[2], weighted[2]) and plain[3] is None
        w = weighted[3]
        assert w.shape == weighted[2].shape and w.dtype == np.float32 and set(np.unique(w)) == {1.0, 4.0}
        order = epoch_order(5, 2, 0)
        assert (w[list(order).index(3)] == 1).all()
        if augment is None:  # no geometry: the weights are where the lesion masks are
            assert np.array_equal(w[:, 0] == 4, lesions[order] > 0)
    # with the augmentation, each image's weights are its lesion moved by that image's rotation and shift
    rng = np.random.default_rng([2, 0, 0])
    order = epoch_order(5, 2, 0)
    for k, i in enumerate(order):
        _, _, moved = Augment().apply(arr.images[i], arr.masks[i], rng, lesions[i], moved_lesion=True)
        assert np.array_equal(weighted[3][k, 0] == 4, moved > 0)
    assert not np.array_equal(weighted[3][:, 0] == 4, lesions[order] > 0)  # it did move
    with pytest.raises(ValueError, match="lesion masks"):
        make_batch(arr, [0, 1], lesion_weight=2.0)


def test_severe_images_repeat_and_the_default_order_is_unchanged(tmp_path):
    lung = np.zeros((5, 8, 8), np.uint8)
    lung[:, 2:6, 2:6] = 1  # 16 lung pixels each, but image 4 has none
    lung[4] = 0
    lesion = np.zeros_like(lung)
    lesion[1, 2:4, 2:6] = 1  # exactly half the lung: severe
    lesion[2, 2:3, 2:6] = 1  # a quarter: not
    lesion[3] = lung[3]  # all of it: severe
    lesion[4, 0, 0] = 1  # no lung: never severe
    assert list(repeat_severe(lung, lesion, 1)) == [0, 1, 2, 3, 4]
    assert list(repeat_severe(lung, lesion, 3)) == [0, 1, 2, 3, 4, 1, 3, 1, 3]
    make_generic(tmp_path, n=7)
    arr = load_arrays(find_data(tmp_path).items(), 32, cache_dir=None)
    plain = list(BatchLoader(arr, 3, seed=3, epoch=1))
    same = list(BatchLoader(arr, 3, seed=3, epoch=1, items=np.arange(7)))
    for (b1, x1, y1, _), (b2, x2, y2, _) in zip(plain, same, strict=True):  # every image once: the order of before
        assert b1 == b2 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    more = BatchLoader(arr, 3, seed=3, epoch=1, items=np.array([0, 1, 2, 3, 4, 5, 6, 2, 2]))
    assert more.n_batches == 3 and sorted(more.order) == [0, 1, 2, 2, 2, 3, 4, 5, 6]


def test_shipped_sample_is_balanced_and_listed():
    idx = find_data(SAMPLE, "lung")
    items = idx.items()
    assert len(items) == 150 and all(sum(it.group == c for it in items) == 50 for c in CLASSES)
    listed = read_name_list(SAMPLE / "FILES.txt")
    assert len(listed) == 150 and all(any(n.endswith(it.image.name) for n in listed) for it in items)
    assert find_data(SAMPLE, "infection").items()[0].mask.parent.name == "infection masks"
    assert (SAMPLE / "ATTRIBUTION.md").read_text().count("Computers in Biology") == 2
