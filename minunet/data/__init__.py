"""Datasets, from a folder to training batches, one concern per module:

    discover.py     find_data: the layout of a folder and every image with its mask (DataIndex, Item)
    split.py        make_split: the training and validation images; name lists and name matching
    split_files.py  split files (a run's split.json, the committed COVID-QU-Ex split), --split-file, --exclude
    decode.py       read_image / read_mask / binarise_mask: what a file holds, read right or refused;
                    load_arrays: decode once into uint8 (N, S, S) arrays, through an on-disk cache
    batches.py      BatchLoader: seeded epoch order and augmentation, the next batch built ahead

A training run goes through them in that order:
``find_data -> make_split (or split_from_file) -> load_arrays -> BatchLoader``.
"""

from minunet.data.batches import (
    Augment,
    BatchLoader,
    epoch_order,
    iter_eval_batches,
    make_batch,
    num_batches,
    repeat_severe,
)
from minunet.data.decode import (
    ArraySet,
    Decoded,
    MaskStats,
    binarise_mask,
    cache_key,
    decode_item,
    default_cache_dir,
    load_arrays,
    read_gray,
    read_image,
    read_mask,
    resize_gray,
)
from minunet.data.discover import IMAGE_EXTS, MASK_KINDS, DataIndex, Item, find_data, is_image, list_images, subdir
from minunet.data.split import Split, make_split, name_matches, read_name_list
from minunet.data.split_files import filter_items, read_exclude, read_split, resolve_split_path, split_from_file

__all__ = [
    "IMAGE_EXTS", "MASK_KINDS", "ArraySet", "Augment", "BatchLoader", "DataIndex", "Decoded", "Item", "MaskStats",
    "Split", "binarise_mask", "cache_key", "decode_item", "default_cache_dir", "epoch_order", "filter_items",
    "find_data", "is_image", "iter_eval_batches", "list_images", "load_arrays", "make_batch", "make_split",
    "name_matches", "num_batches", "read_exclude", "read_gray", "read_image", "read_mask", "read_name_list",
    "read_split", "repeat_severe", "resize_gray", "resolve_split_path", "split_from_file", "subdir",
]
