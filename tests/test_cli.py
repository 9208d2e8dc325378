"""The command line: train -> evaluate -> predict end to end, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from minidata import make_generic, make_qu, save
from PIL import Image

from minunet.cli import main
from minunet.postprocess import drop_small, keep_largest, label_components

TINY = ["--backend", "numpy", "--base-channels", "4", "--depth", "2", "--size", "32", "--batch-size", "4",
        "--no-cache"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained with the CLI on tiny COVID-QU-Ex-style data (Train + Test splits)."""
    root = tmp_path_factory.mktemp("cli")
    make_qu(root / "data", n_per_class=4, splits=("Train", "Test"))
    r = run("train", root / "data", "--epochs", "2", "--out", root / "run", *TINY)
    assert r.exit_code == 0, r.output
    return root


def assert_one_line_error(r, *words):
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit)
    err = r.stderr.strip()
    assert "Traceback" not in r.output and len(err.splitlines()) == 1 and err.startswith("Error:"), err
    for w in words:
        assert w in err, (w, err)


def test_help_lists_every_command_with_examples():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("train", "evaluate", "predict", "summary", "gradcheck"):
        assert cmd in r.output
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Examples" in sub.output and f"minunet {cmd}" in sub.output


def test_options_take_their_defaults_from_train_config():
    """Each training default is written once, in TrainConfig; the options of train, evaluate and
    summary read it, and --help shows it."""
    from minunet.cli.evaluate import evaluate_cmd
    from minunet.cli.summary import summary_cmd
    from minunet.cli.train import train_cmd
    from minunet.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    shared = {train_cmd: set(defaults) - {"workers"}, summary_cmd: {"base_channels", "depth", "size", "batch_size"},
              evaluate_cmd: {"mask", "batch_size", "backend"}}
    for cmd, names in shared.items():
        options = {p.name: p for p in cmd.params if p.name in names}
        assert set(options) == names, (cmd.name, names - set(options))
        for name, p in options.items():
            assert p.default == defaults[name], (cmd.name, name, p.default, defaults[name])
            assert p.show_default or defaults[name] is None, (cmd.name, name)
    helptext = " ".join(run("train", "--help").output.split())
    for flag, value in (("--epochs", 10), ("--lr", 0.001), ("--size", 256), ("--val-fraction", 0.1)):
        assert value == defaults[flag[2:].replace("-", "_")] and f"[default: {value}]" in helptext, flag


def test_the_cli_imports_only_public_names():
    """Private helpers (a leading _) stay in their module: the commands use the library's public API."""
    for path in sorted((Path(__file__).resolve().parent.parent / "minunet" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minunet"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, (path.name, node.module, private)


def test_train_prints_a_row_per_epoch(trained):
    out = trained / "run"
    lines = (out / "history.csv").read_text().splitlines()
    assert len(lines) == 3 and (out / "best.npz").is_file() and (out / "curves.png").is_file()
    split = json.loads((out / "split.json").read_text())
    assert all("/Train/" in n for n in split["train"] + split["val"])  # Test stays held out


def test_evaluate_defaults_to_test_split_and_prints_json(trained):
    r = run("evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--json", "--backend", "numpy")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["split"] == "test" and res["n_images"] == 12 and 0 <= res["dice"] <= 1
    assert {"dice", "dice_pooled", "iou", "n_images", "n_empty_masks"} <= set(res)
    assert set(res["per_class"]) == {"COVID-19", "Non-COVID", "Normal"}
    r = run("evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--split", "train",
            "--backend", "numpy", "--mask", "infection")
    assert r.exit_code == 0, r.output
    assert "Dice (mean per image)" in r.output and "empty masks            8" in r.output and "Non-COVID" in r.output


def test_predict_writes_masks_at_the_original_size(trained, tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (45, 37, 3), dtype=np.uint8)  # RGB, odd size
    Image.fromarray(img).save(tmp_path / "scan (1).png")
    r = run("predict", tmp_path / "scan (1).png", "--model", trained / "run" / "best.npz", "--out",
            tmp_path / "pred", "--keep-largest", "2", "--backend", "numpy")
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(tmp_path / "pred" / "scan (1)_mask.png"))
    over = Image.open(tmp_path / "pred" / "scan (1)_overlay.png")
    assert mask.shape == (45, 37) and set(np.unique(mask)) <= {0, 255} and over.size == (37, 45)
    assert label_components(mask > 0)[1].size <= 2


def test_keep_largest_components():
    m = np.zeros((9, 12), bool)
    m[1:4, 1:5] = True  # 12 pixels
    m[6:9, 6:12] = True  # 18 pixels
    m[0, 10] = True  # 1 pixel
    m[5, 0:2] = True  # 2 pixels, touches nothing (4-connectivity)
    labels, sizes = label_components(m)
    assert sorted(sizes.tolist()) == [1, 2, 12, 18] and labels.max() == 4
    two = keep_largest(m, 2)
    assert two.sum() == 30 and two[1, 1] and two[8, 11] and not two[0, 10]
    assert np.array_equal(keep_largest(m, 0), m) and np.array_equal(keep_largest(m, 9), m)
    u = np.zeros((5, 5), bool)
    u[:, 0] = u[:, 4] = u[4, :] = True  # a U joins through its bottom row
    assert label_components(u)[1].tolist() == [13]


def test_drop_small_components():
    m = np.zeros((10, 10), bool)
    m[0:3, 0:3] = True  # 9 pixels
    m[6:10, 6:10] = True  # 16 pixels
    m[0, 9] = True  # 1 pixel
    assert drop_small(m, 0.10).sum() == 16  # components under 10 of the 100 pixels go
    assert drop_small(m, 0.09).sum() == 25  # 9 is not under 9
    assert np.array_equal(drop_small(m, 0), m)
    batch = np.stack([m, ~m])[:, None]
    assert drop_small(batch, 0.10).shape == batch.shape and drop_small(batch, 0.10)[0, 0].sum() == 16


def test_summary_matches_the_model():
    from minunet.model import UNet

    r = run("summary", "--base-channels", "4", "--depth", "2", "--size", "32")
    assert r.exit_code == 0, r.output
    assert f"{UNet(1, 4, 2).num_params():,}" in r.output and "(1, 1, 32, 32)" in r.output and "FLOPs" in r.output


def test_gradcheck_passes_on_numpy():
    r = run("gradcheck", "--backend", "numpy", "--depth", "1")
    assert r.exit_code == 0, r.output
    assert "conv2d 3x3 dx" in r.output and "head.weight" in r.output and "NOT OK" not in r.output


# -- bad input: one line on stderr, exit status 2 ---------------------------------


def test_missing_and_empty_data_folder(tmp_path):
    assert_one_line_error(run("train", tmp_path / "nope", "--out", tmp_path / "o", *TINY), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("train", tmp_path / "empty", "--out", tmp_path / "o", *TINY), "no images found")
    assert_one_line_error(run("evaluate", tmp_path / "empty"), "no images found")


def test_image_without_mask(tmp_path):
    make_generic(tmp_path / "d", n=4)
    (tmp_path / "d" / "masks" / "img 2.png").unlink()
    assert_one_line_error(run("train", tmp_path / "d", "--out", tmp_path / "o", *TINY), "img 2.png", "no mask")


def test_corrupt_image(tmp_path):
    make_generic(tmp_path / "d", n=4)
    (tmp_path / "d" / "images" / "img 3.png").write_bytes(b"\x89PNG broken")
    assert_one_line_error(run("train", tmp_path / "d", "--out", tmp_path / "o", *TINY), "img 3.png", "cannot read")


def test_image_and_mask_of_different_sizes(tmp_path):
    make_generic(tmp_path / "d", n=4)
    save(tmp_path / "d" / "masks" / "img 1.png", np.zeros((20, 40), np.uint8))
    assert_one_line_error(run("train", tmp_path / "d", "--out", tmp_path / "o", *TINY), "img 1.png", "same size")


def test_size_not_divisible(tmp_path):
    make_generic(tmp_path / "d", n=4)
    args = ["train", tmp_path / "d", "--out", tmp_path / "o", *TINY, "--size", "30"]
    assert_one_line_error(run(*args), "--size 30", "2**depth")


@pytest.mark.parametrize("flag,value", [("--epochs", "-1"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "-0.1"),
                                        ("--batch-size", "0"), ("--val-fraction", "1"), ("--epochs", "many")])
def test_invalid_numbers(tmp_path, flag, value):
    make_generic(tmp_path / "d", n=4)
    assert_one_line_error(run("train", tmp_path / "d", "--out", tmp_path / "o", *TINY, flag, value), flag)


def test_model_missing_or_not_a_checkpoint(trained, tmp_path):
    data = trained / "data"
    assert_one_line_error(run("evaluate", data, "--model", tmp_path / "none.npz"), "none.npz", "does not exist")
    (tmp_path / "fake.npz").write_text("hello")
    assert_one_line_error(run("evaluate", data, "--model", tmp_path / "fake.npz"), "not a minunet checkpoint")
    assert_one_line_error(run("predict", data, "--out", tmp_path / "p", "--model", tmp_path / "fake.npz"),
                          "not a minunet checkpoint")
    assert_one_line_error(run("predict", tmp_path / "nothing.png", "--out", tmp_path / "p"), "does not exist")


def test_default_model_missing_is_a_clear_error(trained, tmp_path, monkeypatch):
    from minunet.cli import common

    missing = tmp_path / "lung_unet.npz"  # stands in for an install without the shipped model
    monkeypatch.setattr(common, "DEFAULT_MODEL", missing)
    assert_one_line_error(run("evaluate", trained / "data", "--model", missing), "shipped model", "--model")
    missing_lesions = tmp_path / "infection_unet.npz"
    monkeypatch.setattr(common, "DEFAULT_INFECTION_MODEL", missing_lesions)
    monkeypatch.setattr(common, "DEFAULT_MODEL", trained / "run" / "best.npz")
    # --mask infection picks the shipped lesion model, not the lung model
    assert_one_line_error(run("evaluate", trained / "data", "--mask", "infection"), "infection_unet.npz", "--model")


def test_checkpoint_config_not_matching_flags(trained):
    args = ["evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--backend", "numpy"]
    assert_one_line_error(run(*args, "--depth", "3"), "depth 3", "checkpoint has 2")
    r = run("train", trained / "data", "--out", trained / "run", "--resume", "--loss", "bce+dice", "--epochs", "3")
    assert_one_line_error(r, "--resume", "loss")


def test_existing_run_folder_needs_resume_or_force(trained):
    r = run("train", trained / "data", "--out", trained / "run", *TINY)
    assert_one_line_error(r, "already holds a run", "--resume")


def test_export_float16_gives_the_same_scores(trained, tmp_path):
    r = run("export", trained / "run" / "best.npz", tmp_path / "m16.npz", "--float16")
    assert r.exit_code == 0, r.output
    scores = []
    for m in (trained / "run" / "best.npz", tmp_path / "m16.npz"):
        r = run("evaluate", trained / "data", "--model", m, "--json", "--backend", "numpy")
        assert r.exit_code == 0, r.output
        scores.append(json.loads(r.stdout)["dice"])
    assert scores[1] == pytest.approx(scores[0], abs=0.01)
    assert (tmp_path / "m16.npz").stat().st_size < (trained / "run" / "best.npz").stat().st_size / 2


def test_evaluate_only_the_held_out_images_of_a_run(trained):
    split = json.loads((trained / "run" / "split.json").read_text())
    r = run("evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--json", "--backend", "numpy",
            "--only", trained / "run" / "split.json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == len(split["val"]) == 3
    r = run("evaluate", trained / "data" / "Infection Segmentation Data" / "Train" / "Normal", "--model",
            trained / "run" / "best.npz", "--json", "--backend", "numpy", "--only", trained / "run" / "split.json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == sum("/Normal/" in n for n in split["val"])


def test_evaluate_a_split_files_test_list_with_infection_figures(trained, tmp_path):
    split = {"train": [], "val": ["COVID-19/COVID_19 (Train 0).png"],
             "test": ["COVID-19/COVID_19 (Train 1).png", "Normal/Normal (Train 2).png"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    args = ("evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--json", "--backend", "numpy",
            "--mask", "infection", "--split", "train", "--only", tmp_path / "split.json")
    r = run(*args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_images"] == 2 and res["n_nonempty"] == 1 and res["split"].endswith("(only the test of split.json)")
    assert {"dice_nonempty", "fp_image_rate", "n_nonempty"} <= set(res["per_class"]["Normal"])
    assert res["per_class"]["Normal"]["dice_nonempty"] is None  # JSON null, never NaN
    assert json.loads(run(*args, "--subset", "val").stdout)["n_images"] == 1
    assert_one_line_error(run(*args, "--subset", "bogus"), "bogus")
    r = run(*args[:-2], "--subset", "val")
    assert_one_line_error(r, "--only")


def test_cupy_backend_without_a_gpu_is_a_clear_error(tmp_path):
    from minunet.kernels.cupy import cuda_status

    if cuda_status()[0]:
        pytest.skip("a CUDA device answers here")
    assert_one_line_error(run("train", "--backend", "cupy", "--epochs", "1", "--out", tmp_path / "run"),
                          "cupy backend", "minunet[gpu]")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
@pytest.mark.parametrize("command", ["bench", "gradcheck", "train", "evaluate", "predict"])
def test_every_command_turns_a_backend_that_cannot_start_into_one_line(trained, tmp_path, command):
    model = trained / "run" / "best.npz"
    args = {"bench": ["--no-ops", "--no-torch", "--size", "32", "--depth", "2", "--base", "4"],
            "gradcheck": [],
            "train": [trained / "data", "--epochs", "1", "--out", tmp_path / "run", "--no-cache"],
            "evaluate": [trained / "data", "--model", model, "--json"],
            "predict": [trained / "data", "--out", tmp_path / "pred", "--model", model]}[command]
    assert_one_line_error(run(command, *args, "--backend", "cupy"), "cupy")


def test_unwritable_cache_is_one_warning_line_and_training_goes_on(tmp_path):
    make_generic(tmp_path / "d", n=6)
    (tmp_path / "file").write_text("a file, not a folder")
    with_cache = [a for a in TINY if a != "--no-cache"]
    r = run("train", tmp_path / "d", "--epochs", "1", "--out", tmp_path / "o", *with_cache,
            "--cache-dir", tmp_path / "file" / "cache")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if "cache" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: cannot write the decoded-image cache"), r.stderr
    assert "Warning" not in r.stderr  # not Python's two-line "file:line: MinunetWarning" form


def test_predict_keeps_the_real_data_error(tmp_path, monkeypatch):
    import minunet.data
    from minunet.errors import DataError

    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("predict", tmp_path / "empty", "--out", tmp_path / "p"), "holds no images")
    (tmp_path / "scans" / "patient1").mkdir(parents=True)  # no images at the top: read as a data folder

    def unreadable(root, *args, **kwargs):
        raise DataError(f"cannot list {root}/patient1 (permission denied): check the folder's permissions")

    monkeypatch.setattr(minunet.data, "find_data", unreadable)
    assert_one_line_error(run("predict", tmp_path / "scans", "--out", tmp_path / "p"), "permission denied")


def test_export_keeps_no_path_of_the_training_machine(trained, tmp_path):
    import re
    import zipfile

    from minunet.checkpoint import load_checkpoint

    r = run("export", trained / "run" / "best.npz", tmp_path / "m.npz")
    assert r.exit_code == 0, r.output
    meta = load_checkpoint(tmp_path / "m.npz").meta

    def strings(v):
        if isinstance(v, dict):
            for k, x in v.items():
                yield k
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v

    absolute = [s for s in strings(meta) if s.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", s)]
    assert absolute == [] and str(trained) not in json.dumps(meta), absolute
    # what a user can use is kept: the model, the data set's name, the recipe, the split lists
    assert meta["model"]["depth"] == 2 and meta["train_config"]["data"] == f"{trained.name}/data"
    assert meta["train_config"]["mask"] == "lung" and meta["train_config"]["size"] == 32
    split = json.loads((trained / "run" / "split.json").read_text())
    assert meta["split"]["train"] == split["train"] and meta["split"]["val"] == split["val"]
    assert meta["split"]["layout"] == "covid-qu-ex" and meta["exported_from"] == "run/best.npz"
    assert meta["state"]["history"] == load_checkpoint(trained / "run" / "best.npz").meta["state"]["history"]
    with zipfile.ZipFile(tmp_path / "m.npz") as z:  # deflated: the split lists are most of the meta
        assert z.getinfo("meta.npy").compress_type == zipfile.ZIP_DEFLATED
    # exporting an export keeps the same record
    assert run("export", tmp_path / "m.npz", tmp_path / "again.npz").exit_code == 0
    assert load_checkpoint(tmp_path / "again.npz").meta == meta
    (tmp_path / "split.json").write_text("{ damaged")
    assert_one_line_error(run("export", tmp_path / "m.npz", tmp_path / "x.npz"), "split.json", "damaged")


def test_exported_post_processing_becomes_the_models_default(trained, tmp_path):
    r = run("export", trained / "run" / "best.npz", tmp_path / "pp.npz", "--threshold", "0.7", "--min-area", "0.02")
    assert r.exit_code == 0, r.output
    base = ("evaluate", trained / "data", "--json", "--backend", "numpy", "--model")
    res = json.loads(run(*base, tmp_path / "pp.npz").stdout)
    assert (res["threshold"], res["min_area"]) == (0.7, 0.02)
    res = json.loads(run(*base, tmp_path / "pp.npz", "--threshold", "0.4", "--min-area", "0").stdout)
    assert (res["threshold"], res["min_area"]) == (0.4, 0.0)  # flags win
    res = json.loads(run(*base, trained / "run" / "best.npz").stdout)
    assert (res["threshold"], res["min_area"]) == (0.5, 0.0)  # a model that says nothing
    assert_one_line_error(run("export", trained / "run" / "best.npz", tmp_path / "x.npz", "--min-area", "2"),
                          "--min-area")
    assert_one_line_error(run(*base, tmp_path / "pp.npz", "--keep-largest", "-3"), "--keep-largest")


def test_evaluate_json_never_prints_a_bare_nan(trained, monkeypatch):
    import minunet.evaluation as evaluation

    real = evaluation.evaluate_model

    def nan_loss(*a, **kw):
        ev = real(*a, **kw)
        ev.summary["loss"] = float("nan")
        return ev

    monkeypatch.setattr(evaluation, "evaluate_model", nan_loss)
    r = run("evaluate", trained / "data", "--json", "--backend", "numpy", "--model", trained / "run" / "best.npz")
    assert r.exit_code == 0, r.output
    assert "NaN" not in r.stdout and json.loads(r.stdout)["loss"] is None


def test_predict_mask_infection_uses_the_shipped_lesion_model(trained, tmp_path, monkeypatch):
    from minunet.cli import common

    monkeypatch.setattr(common, "DEFAULT_INFECTION_MODEL", tmp_path / "infection_unet.npz")
    img = trained / "data" / "Infection Segmentation Data" / "Train" / "Normal" / "images" / "Normal (Train 0).png"
    assert_one_line_error(run("predict", img, "--out", tmp_path / "p", "--mask", "infection"), "infection_unet.npz")
    monkeypatch.setattr(common, "DEFAULT_INFECTION_MODEL", trained / "run" / "best.npz")
    r = run("predict", img, "--out", tmp_path / "p", "--mask", "infection", "--backend", "numpy")
    assert r.exit_code == 0 and (tmp_path / "p" / "Normal (Train 0)_mask.png").is_file(), r.output


# -- checkpoints that must not be used -----------------------------------------------


def rewrite_checkpoint(src, dst, meta=None, params=None):
    """A copy of checkpoint ``src`` with its meta replaced (when given) and some parameters changed."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    for name, value in (params or {}).items():
        arrays[f"param/{name}"] = value
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("name,bad", [("enc1.conv2.weight", np.nan), ("head.bias", np.inf)])
def test_every_command_refuses_a_checkpoint_with_non_finite_weights(trained, tmp_path, name, bad):
    best = trained / "run" / "best.npz"
    with np.load(best) as z:
        w = z[f"param/{name}"].copy()
    w.flat[0] = bad
    model = rewrite_checkpoint(best, tmp_path / "bad.npz", params={name: w})
    img = trained / "data" / "Infection Segmentation Data" / "Test" / "Normal" / "images" / "Normal (Test 0).png"
    for args in (["evaluate", trained / "data", "--model", model, "--backend", "numpy"],
                 ["predict", img, "--out", tmp_path / "p", "--model", model, "--backend", "numpy"],
                 ["quantify", img, "--out", tmp_path / "q", "--lung-model", model, "--infection-model", model,
                  "--backend", "numpy"],
                 ["export", model, tmp_path / "e.npz"]):
        assert_one_line_error(run(*args), name, "NaN or inf")
    assert not (tmp_path / "p").exists() and not (tmp_path / "e.npz").exists()


@pytest.mark.parametrize("change,named", [
    ({"model": [1, 4, 2]}, "model"),
    ({"model": {"in_channels": 1, "base_channels": "4", "depth": 2}}, "model.base_channels"),
    ({"model": {"in_channels": 1, "base_channels": 4, "depth": True}}, "model.depth"),
    ({"train_config": ["size", 32]}, "train_config"),
    ({"train_config": {"size": "32"}}, "train_config.size"),
    ({"postprocess": {"threshold": "high"}}, "postprocess.threshold"),
    ({"postprocess": 0.5}, "postprocess"),
    ({"postprocess": {"view_shift": 1.5}}, "postprocess.view_shift"),
    ({"state": [1, 2]}, "state"),
    ({"state": {"epoch": "two"}}, "state.epoch"),
    ({"split": {"train": "all of them"}}, "split.train"),
])
def test_a_hand_made_checkpoint_with_meta_of_the_wrong_type_is_one_line(trained, tmp_path, change, named):
    best = trained / "run" / "best.npz"
    with np.load(best) as z:
        meta = json.loads(str(z["meta"]))
    model = rewrite_checkpoint(best, tmp_path / "m.npz", meta={**meta, **change})
    img = trained / "data" / "Infection Segmentation Data" / "Test" / "Normal" / "images" / "Normal (Test 0).png"
    words = ("m.npz", f"meta {named} ")
    assert_one_line_error(run("evaluate", trained / "data", "--model", model, "--backend", "numpy"), *words)
    assert_one_line_error(run("predict", img, "--out", tmp_path / "p", "--model", model), *words)
    assert_one_line_error(run("export", model, tmp_path / "e.npz"), *words)


def test_the_loader_checks_every_part_of_the_position_training_saves(trained):
    from minunet.checkpoint import RUN_STATE, load_checkpoint

    assert set(load_checkpoint(trained / "run" / "last.npz").meta["state"]) == set(RUN_STATE)


# -- predict: whole data folders, bad files, its own outputs ----------------------------


def test_predict_and_quantify_a_covid_qu_ex_split_without_masks(trained, tmp_path):
    """The official Test split layout: <split>/<class>/images/ with no mask folders."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    test = data / "Infection Segmentation Data" / "Test"
    for c in test.iterdir():
        shutil.rmtree(c / "lung masks")
        shutil.rmtree(c / "infection masks")
    model = trained / "run" / "best.npz"
    r = run("predict", test, "--out", tmp_path / "p", "--model", model, "--backend", "numpy")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "p").glob("*_mask.png"))) == 12
    r = run("predict", data, "--out", tmp_path / "all", "--model", model, "--backend", "numpy")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "all").glob("*_mask.png"))) == 24  # Train and Test
    r = run("quantify", test, "--out", tmp_path / "q", "--lung-model", model, "--infection-model", model,
            "--backend", "numpy")
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "q" / "quantify.csv").read_text().splitlines()) == 1 + 12
    r = run("evaluate", data, "--model", model, "--backend", "numpy", "--json")  # scores the split with masks
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 12 and json.loads(r.stdout)["split"] == "train"


def test_predict_skip_bad_goes_on_and_lists_what_it_skipped(trained, tmp_path):
    scans = tmp_path / "scans"
    for i in range(3):
        save(scans / f"ok {i}.png", np.full((40, 40), 60 * i, np.uint8))
    (scans / "broken.png").write_bytes(b"\x89PNG broken")
    (scans / "empty.jpg").write_bytes(b"")
    model = ["--model", trained / "run" / "best.npz", "--backend", "numpy", "--batch-size", "2"]
    assert_one_line_error(run("predict", scans, "--out", tmp_path / "p", *model), "broken.png", "--skip-bad")
    r = run("predict", scans, "--out", tmp_path / "p", *model, "--skip-bad")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "p").glob("*_mask.png")) == [f"ok {i}_mask.png" for i in range(3)]
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped")]
    assert len(skipped) == 2 and "broken.png" in skipped[0] + skipped[1] and "empty.jpg" in skipped[0] + skipped[1]
    assert "skipped 2" in r.stdout
    (scans / "ok 0.png").unlink()
    (scans / "ok 1.png").unlink()
    (scans / "ok 2.png").unlink()
    assert_one_line_error(run("predict", scans, "--out", tmp_path / "p2", *model, "--skip-bad"), "none of the 2")


def test_predict_no_overlay_and_an_8_bit_probability_map(trained, tmp_path):
    from minunet.checkpoint import load_checkpoint
    from minunet.data import read_gray
    from minunet.inference import probabilities

    img = trained / "data" / "Infection Segmentation Data" / "Test" / "COVID-19" / "images" / "COVID_19 (Test 1).png"
    r = run("predict", img, "--out", tmp_path / "p", "--model", trained / "run" / "best.npz", "--backend", "numpy",
            "--no-overlay", "--save-prob")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["COVID_19 (Test 1)_mask.png",
                                                                "COVID_19 (Test 1)_prob.png"]
    prob = Image.open(tmp_path / "p" / "COVID_19 (Test 1)_prob.png")
    assert prob.mode == "L" and prob.size == (40, 40)
    p = next(probabilities(load_checkpoint(trained / "run" / "best.npz").build_model(), [read_gray(img)], 32))
    assert np.array_equal(np.asarray(prob), np.rint(p.astype(np.float64) * 255).astype(np.uint8))  # 255 = 1


def test_predict_and_quantify_never_read_their_own_outputs(trained, tmp_path):
    scans = tmp_path / "scans"
    for i in range(2):
        save(scans / f"scan {i}.png", np.full((40, 40), 80 * i, np.uint8))
    model = trained / "run" / "best.npz"
    for _ in range(2):  # the second run finds the first one's masks, overlays and maps in the folder
        r = run("predict", scans, "--out", scans, "--model", model, "--backend", "numpy", "--save-prob")
        assert r.exit_code == 0, r.output
        assert "wrote 2 mask(s)" in r.stdout
    assert sorted(p.name for p in scans.iterdir()) == sorted(
        f"scan {i}{s}.png" for i in range(2) for s in ("", "_mask", "_overlay", "_prob"))
    for _ in range(2):
        r = run("quantify", scans, "--out", scans, "--lung-model", model, "--infection-model", model,
                "--backend", "numpy")
        assert r.exit_code == 0, r.output
        assert "quantified 2 image(s)" in r.stdout
    # named one by one (a shell glob), they are left out too; only outputs: nothing to do
    r = run("predict", *sorted(scans.glob("*.png")), "--out", scans, "--model", model, "--backend", "numpy")
    assert r.exit_code == 0 and "wrote 2 mask(s)" in r.stdout, r.output
    assert_one_line_error(run("predict", scans / "scan 0_mask.png", "--out", scans, "--model", model),
                          "every input is a file that predict or quantify wrote")


# -- evaluate: images the model was trained on, per-image scores, probability maps ----------


def test_checkpoints_record_the_training_list_and_evaluate_warns_about_those_images(trained, tmp_path):
    import shutil

    from minunet.checkpoint import load_checkpoint

    split = json.loads((trained / "run" / "split.json").read_text())
    model = tmp_path / "best.npz"  # away from its run folder: the checkpoint itself must say
    shutil.copy(trained / "run" / "best.npz", model)
    ck = load_checkpoint(model)
    assert ck.meta["split"]["train"] == split["train"] and ck.meta["train_config"]["data"]
    base = ["evaluate", trained / "data", "--model", model, "--backend", "numpy", "--json"]
    r = run(*base, "--split", "train")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_trained_on"] == len(split["train"]) == 9
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "9 of the 12" in warnings[0], r.stderr
    r = run(*base)  # the test split: held out
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_trained_on"] == 0 and "warning" not in r.stderr
    # DATA pointing below the training data root still matches by class and file name
    r = run(*base[:1], trained / "data" / "Infection Segmentation Data" / "Train" / "Normal", *base[2:])
    assert json.loads(r.stdout)["n_trained_on"] == sum("/Normal/" in n for n in split["train"])


def test_evaluate_writes_per_image_scores_and_probability_maps(trained, tmp_path):
    import csv

    r = run("evaluate", trained / "data", "--model", trained / "run" / "best.npz", "--backend", "numpy", "--json",
            "--per-image", tmp_path / "scores.csv", "--save-prob", tmp_path / "prob")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    with open(tmp_path / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
        assert rows and list(rows[0]) == ["image", "class", "dice", "iou", "pred_px", "ref_px"]
    assert len(rows) == res["n_images"] == 12
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(res["dice"], abs=1e-4)
    assert {r["class"] for r in rows} == {"COVID-19", "Non-COVID", "Normal"}
    assert all(r["image"].startswith("Infection Segmentation Data/Test/") for r in rows)
    for row in rows:
        prob = Image.open(tmp_path / "prob" / f"{Path(row['image']).stem}_prob.png")
        assert prob.mode == "L" and prob.size == (32, 32)  # the size the scores are computed at
        assert int((np.asarray(prob) > 127).sum()) == int(row["pred_px"])  # 255 = probability 1
        assert int(row["ref_px"]) > 0


def test_minunet_with_no_arguments_prints_the_help():
    r = run()
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and "Commands:" in r.output and "Error" not in r.output


def test_paths_the_file_system_refuses_are_one_line(trained, tmp_path):
    (tmp_path / "a file").write_text("not a folder")
    (tmp_path / "a folder").mkdir()
    model = trained / "run" / "best.npz"
    img = trained / "data" / "Infection Segmentation Data" / "Test" / "Normal" / "images" / "Normal (Test 0).png"
    assert_one_line_error(run("predict", img, "--out", tmp_path / "a file", "--model", model, "--backend", "numpy"),
                          "a file")
    base = ["evaluate", trained / "data", "--model", model, "--backend", "numpy"]
    assert_one_line_error(run(*base, "--per-image", tmp_path / "a folder"), "a folder")
    assert_one_line_error(run(*base, "--save-prob", tmp_path / "a file"), "a file")
    assert_one_line_error(run("export", model, tmp_path / "a folder"), "a folder")


def test_outputs_of_uid_named_dicom_files_keep_their_whole_name():
    from pathlib import Path

    from minunet.cli.common import output_stem, unique_name

    used = set()
    names = [unique_name(output_stem(Path(f)), used) for f in ("1.2.840.55.3", "1.2.840.55.4", "a.png", "a.dcm")]
    assert names == ["1.2.840.55.3", "1.2.840.55.4", "a", "a_2"]


def test_export_keeps_the_checkpoints_precision_unless_told(trained, tmp_path):
    from minunet.checkpoint import load_checkpoint

    def dtypes(path):
        return {str(a.dtype) for a in load_checkpoint(path).params.values()}

    assert run("export", trained / "run" / "best.npz", tmp_path / "keep.npz").exit_code == 0
    assert dtypes(tmp_path / "keep.npz") == {"float32"}  # a training checkpoint stays float32
    r = run("export", trained / "run" / "best.npz", tmp_path / "half.npz", "--float16")
    assert r.exit_code == 0 and "float16 weights" in r.output and dtypes(tmp_path / "half.npz") == {"float16"}
    assert run("export", tmp_path / "half.npz", tmp_path / "again.npz").exit_code == 0
    assert dtypes(tmp_path / "again.npz") == {"float16"}  # an export of an export stays float16
    assert run("export", tmp_path / "half.npz", tmp_path / "up.npz", "--float32").exit_code == 0
    assert dtypes(tmp_path / "up.npz") == {"float32"}
