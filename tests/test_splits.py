"""The committed COVID-QU-Ex split and split files: rebuilt identically, used by train and evaluate."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from minidata import make_qu

from minunet.checkpoint import load_checkpoint
from minunet.data import find_data, read_name_list, read_split, split_from_file
from minunet.data.split_files import NAMED, build_fixed_split, index_from_names
from minunet.errors import CheckpointError, ConfigError, DataError
from minunet.train import TrainConfig, train

SAMPLE_FILES = NAMED["covid-qu-ex"].parent.parent / "sample" / "FILES.txt"


def test_committed_split_rebuilds_identically():
    parts = read_split("covid-qu-ex")
    names = parts["train"] + parts["val"] + parts["test"]
    assert len(names) == len(set(names)) == 3728 - 150  # disjoint, everything but the sample
    assert build_fixed_split(index_from_names(names), set()) == parts


def test_committed_split_is_per_class_and_leaves_out_the_sample():
    parts = read_split("covid-qu-ex")
    sample = {f"{n.split('/')[1]}/{n.rsplit('/', 1)[-1]}" for n in read_name_list(SAMPLE_FILES)}
    assert len(sample) == 150
    assert not sample & set(parts["train"] + parts["val"] + parts["test"])
    counts = {p: Counter(n.split("/")[0] for n in v) for p, v in parts.items()}
    assert counts["test"] == counts["val"] == {"COVID-19": 181, "Non-COVID": 88, "Normal": 88}
    assert sum(counts["train"].values()) == 2864


def test_split_depends_on_the_seed():
    parts = read_split("covid-qu-ex")
    names = parts["train"] + parts["val"] + parts["test"]
    assert build_fixed_split(index_from_names(names), set(), seed=1)["test"] != parts["test"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qu")
    make_qu(root, n_per_class=4)
    return root


def _write_split(path, index, n_val=1):
    """A split file naming, per class, the first n_val images val, the last one test, the rest train."""
    doc = {"train": [], "val": [], "test": []}
    for c in ("COVID-19", "Non-COVID", "Normal"):
        names = [f"{c}/{it.name.rsplit('/', 1)[-1]}" for it in index.items("all") if it.group == c]
        doc["val"] += names[:n_val]
        doc["test"] += names[-1:]
        doc["train"] += names[n_val:-1]
    path.write_text(json.dumps(doc))
    return doc


def test_training_uses_the_split_files_train_and_val_lists(data_dir, tmp_path):
    index = find_data(data_dir, "infection")
    doc = _write_split(tmp_path / "split.json", index)
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), mask="infection", epochs=1, batch_size=3,
                      base_channels=4, depth=2, size=32, backend="numpy", cache_dir="",
                      split_file=str(tmp_path / "split.json"))
    res = train(cfg)
    assert res.status == "done"
    run_split = json.loads((tmp_path / "run" / "split.json").read_text())
    short = [[n.split("/")[-3] + "/" + n.rsplit("/", 1)[-1] for n in run_split[p]] for p in ("train", "val")]
    assert short == [doc["train"], doc["val"]]  # the test images stay out of both
    row = res.history[0]
    assert row["val_fp_image_rate"] is not None and row["val_dice_nonempty"] is not None
    assert row["val_score"] == pytest.approx(row["val_dice_nonempty"] * (1 - row["val_fp_image_rate"]))


def test_a_split_file_without_val_or_matching_images_is_refused(data_dir, tmp_path):
    index = find_data(data_dir, "lung")
    (tmp_path / "no_val.json").write_text(json.dumps({"train": ["COVID-19/x.png"]}))
    with pytest.raises(ConfigError, match="no val list"):
        split_from_file(index, str(tmp_path / "no_val.json"))
    (tmp_path / "other.json").write_text(json.dumps({"train": ["A/x.png"], "val": ["A/y.png"]}))
    with pytest.raises(DataError, match="none of the images"):
        split_from_file(index, str(tmp_path / "other.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"train": "COVID-19/x.png"}))
    with pytest.raises(DataError, match="list of image names"):
        split_from_file(index, str(tmp_path / "bad.json"))


def test_training_can_start_from_another_runs_weights(data_dir, tmp_path):
    base = dict(data=str(data_dir), epochs=1, batch_size=3, base_channels=4, depth=2, size=32, backend="numpy",
                cache_dir="", val_fraction=0.25)
    train(TrainConfig(out=str(tmp_path / "lung"), **base))
    lung = load_checkpoint(tmp_path / "lung" / "last.npz").params
    # with a vanishing lr the run ends where it started: at the other run's weights
    init = str(tmp_path / "lung" / "last.npz")
    res = train(TrainConfig(out=str(tmp_path / "inf"), mask="infection", lr=1e-12, init=init, **base))
    assert res.status == "done"
    after = load_checkpoint(tmp_path / "inf" / "last.npz").params
    for n in lung:
        assert abs(after[n] - lung[n]).max() < 1e-6, n
    with pytest.raises(CheckpointError, match="--init needs"):  # a different width cannot be loaded
        train(TrainConfig(out=str(tmp_path / "x"), init=init, **dict(base, base_channels=8)))
