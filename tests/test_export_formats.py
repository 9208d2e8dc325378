"""minunet export --format npz|safetensors|onnx: exact weights, a config beside, the safetensors read back
wherever minunet takes a model, and ONNX Runtime giving minunet's logits and masks on real X-rays."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import TINY, assert_one_line_error, run, trained  # noqa: F401 (trained is a fixture)

from minunet.checkpoint import load_checkpoint, save_checkpoint
from minunet.errors import CheckpointError
from minunet.model import UNet
from minunet.torch_twin import torch_name

ROOT = Path(__file__).resolve().parent.parent
LUNG_MODEL = ROOT / "minunet" / "assets" / "model" / "lung_unet.npz"
SAMPLE = ROOT / "minunet" / "assets" / "sample" / "Infection Segmentation Data" / "Train"
needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the ONNX checks need onnx and onnxruntime: pip install 'minunet[onnx]' onnxruntime")
# ONNX Runtime sums the convolutions in another order than minunet's numpy backend: the logits agree to
# float32 rounding accumulated over the 23 layers, bounded here by 1e-5 of the largest |logit| (about 80
# float32 epsilons; measured on the shipped lung model: 4.9e-7, 2.7e-5 absolute on logits up to 54.5).
LOGIT_TOLERANCE = 1e-5


def random_checkpoint(path: Path, base=4, depth=2, seed=3) -> UNet:
    """A small U-Net with random (nonzero) biases, saved as a weights-only float32 checkpoint."""
    model = UNet(1, base, depth, backend="numpy", seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if name.endswith("bias"):
            p[...] = rng.normal(0, 0.1, p.shape)
    save_checkpoint(path, model, None, {"train_config": {"size": 32, "out": "/home/someone/runs/x"}})
    return model


def sample_images() -> np.ndarray:
    """(3, 1, 256, 256) float32 sample X-rays scaled by 1/255: the first of each class."""
    files = [sorted((SAMPLE / c / "images").iterdir())[0] for c in ("COVID-19", "Non-COVID", "Normal")]
    return np.stack([np.asarray(Image.open(f), np.float32) / np.float32(255) for f in files])[:, None]


# --- safetensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--float32", "--float16"])
def test_safetensors_holds_the_weights_under_pytorch_names_and_reads_back_exactly(tmp_path, flag):
    from safetensors import safe_open

    model = random_checkpoint(tmp_path / "c.npz")
    assert run("export", tmp_path / "c.npz", tmp_path / "m.npz", flag).exit_code == 0
    r = run("export", tmp_path / "c.npz", tmp_path / "m.safetensors", flag)
    assert r.exit_code == 0, r.output
    dtype = np.float32 if flag == "--float32" else np.float16
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(torch_name(n) for n in model.params)
        for n, p in model.params.items():
            t = f.get_tensor(torch_name(n))
            assert t.dtype == dtype and np.array_equal(t, p.astype(dtype)), n
        meta = f.metadata()
    assert (meta["in_channels"], meta["base_channels"], meta["depth"]) == ("1", "4", "2")
    ck, npz = load_checkpoint(tmp_path / "m.safetensors"), load_checkpoint(tmp_path / "m.npz")
    assert ck.meta == npz.meta and ck.adam is None and "/home/someone" not in json.dumps(ck.meta)
    for n in model.params:
        assert np.array_equal(ck.params[n], npz.params[n]), n
    x = sample_images()[:1, :, :32, :32]
    assert np.array_equal(ck.build_model("numpy").forward(x), npz.build_model("numpy").forward(x))


def test_minunet_takes_its_safetensors_export_wherever_it_takes_a_model(trained, tmp_path):  # noqa: F811
    best = trained / "run" / "best.npz"
    assert run("export", best, tmp_path / "m.safetensors", "--float32").exit_code == 0
    data = trained / "data"
    scores = []
    for m in (best, tmp_path / "m.safetensors"):
        r = run("evaluate", data, "--model", m, "--json", "--backend", "numpy")
        assert r.exit_code == 0, r.output
        scores.append({k: json.loads(r.stdout)[k] for k in ("dice", "iou", "loss", "n_images")})
    assert scores[0] == scores[1]
    img = data / "Infection Segmentation Data" / "Train" / "Normal" / "images" / "Normal (Train 0).png"
    masks = []
    for name, m in (("npz", best), ("st", tmp_path / "m.safetensors")):
        r = run("predict", img, "--out", tmp_path / name, "--model", m, "--backend", "numpy")
        assert r.exit_code == 0, r.output
        masks.append(np.asarray(Image.open(tmp_path / name / "Normal (Train 0)_mask.png")))
    assert np.array_equal(*masks)
    r = run("quantify", img, "--out", tmp_path / "q", "--lung-model", tmp_path / "m.safetensors",
            "--infection-model", tmp_path / "m.safetensors", "--backend", "numpy")
    assert r.exit_code == 0, r.output
    r = run("train", data, "--epochs", "1", "--out", tmp_path / "run", "--init", tmp_path / "m.safetensors", *TINY)
    assert r.exit_code == 0, r.output


def test_a_safetensors_file_that_is_not_minunets_is_one_line(tmp_path):
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without minunet's metadata"):
        load_checkpoint(tmp_path / "other.safetensors")
    random_checkpoint(tmp_path / "c.npz")
    assert run("export", tmp_path / "c.npz", tmp_path / "m.safetensors").exit_code == 0
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "m.onnx").write_bytes(b"an ONNX graph")
    for bad, words in (("other.safetensors", "without minunet's metadata"), ("cut.safetensors", "damaged"),
                       ("m.onnx", "onnxruntime")):
        r = run("predict", sorted((SAMPLE / "Normal" / "images").iterdir())[0], "--out", tmp_path / "p",
                "--model", tmp_path / bad)
        assert_one_line_error(r, bad, words)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (never a dependency)")
def test_the_readme_recipe_loads_the_safetensors_into_pytorch(tmp_path):
    """The README's ten lines: the PyTorch twin takes the export with load_state_dict and gives minunet's logits."""
    import torch
    from safetensors.torch import load_file

    from minunet.torch_twin import torch_twin

    assert run("export", LUNG_MODEL, tmp_path / "lung_unet.safetensors").exit_code == 0
    cfg = json.loads((tmp_path / "lung_unet.json").read_text())["model"]
    net = torch_twin(cfg["in_channels"], cfg["base_channels"], cfg["depth"])
    net.load_state_dict(load_file(tmp_path / "lung_unet.safetensors"))  # float16 tensors into float32 parameters
    net.eval()
    x = sample_images()
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    want = load_checkpoint(LUNG_MODEL).build_model("numpy").forward(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# --- config.json ------------------------------------------------------------------------------------


def test_the_config_beside_says_how_to_run_each_exported_file(tmp_path):
    random_checkpoint(tmp_path / "c.npz")
    r = run("export", tmp_path / "c.npz", tmp_path / "out" / "m.safetensors", "--threshold", "0.6", "--float16")
    assert r.exit_code == 0 and "m.json" in r.stdout, r.output
    cfg = json.loads((tmp_path / "out" / "m.json").read_text())
    assert cfg["model"] == {"architecture": "U-Net (minunet)", "in_channels": 1, "base_channels": 4, "depth": 2}
    assert cfg["input"]["size"] == 32 and cfg["input"]["multiple_of"] == 4
    assert cfg["postprocess"] == {"threshold": 0.6, "min_area": 0.0, "view_shift": 0}
    assert cfg["files"]["m.safetensors"]["format"] == "safetensors"
    assert cfg["files"]["m.safetensors"]["weights_dtype"] == "float16"
    assert "/home/someone" not in json.dumps(cfg) and str(tmp_path) not in json.dumps(cfg)
    # the npz of the same model shares the config; another model's export starts a new one
    assert run("export", tmp_path / "c.npz", tmp_path / "out" / "m.npz", "--threshold", "0.6",
               "--float32").exit_code == 0
    files = json.loads((tmp_path / "out" / "m.json").read_text())["files"]
    assert set(files) == {"m.safetensors", "m.npz"} and files["m.npz"]["weights_dtype"] == "float32"
    assert run("export", tmp_path / "c.npz", tmp_path / "out" / "m.npz", "--threshold", "0.7").exit_code == 0
    assert set(json.loads((tmp_path / "out" / "m.json").read_text())["files"]) == {"m.npz"}


def test_export_refuses_flags_and_names_that_do_not_fit_in_one_line(tmp_path, monkeypatch):
    random_checkpoint(tmp_path / "c.npz")
    c = tmp_path / "c.npz"
    assert_one_line_error(run("export", c, tmp_path / "m.npz", "--sigmoid"), "--format onnx")
    assert_one_line_error(run("export", c, tmp_path / "m.safetensors", "--dynamic"), "--format onnx")
    assert_one_line_error(run("export", c, tmp_path / "m.npz", "--format", "onnx"), "m.onnx")
    assert_one_line_error(run("export", c, tmp_path / "m.json"), ".json", "config")
    r = run("export", c, tmp_path / "weights.bin", "--format", "safetensors")  # an unknown suffix: --format says
    assert r.exit_code == 0 and load_checkpoint(tmp_path / "weights.bin").model_config["depth"] == 2
    assert load_checkpoint(run_export_default(c, tmp_path / "plain")).path.suffix == ""
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert_one_line_error(run("export", c, tmp_path / "m.onnx"), "minunet[onnx]")
    assert not (tmp_path / "m.onnx").exists()


def run_export_default(ckpt, out):
    """Export without --format to a name without a suffix: npz."""
    r = run("export", ckpt, out)
    assert r.exit_code == 0 and "(npz," in r.stdout, r.output
    return out


# --- ONNX -------------------------------------------------------------------------------------------


@needs_ort
def test_onnx_runtime_gives_minunets_logits_and_masks_on_sample_xrays(tmp_path):
    import onnx
    import onnxruntime as ort

    r = run("export", LUNG_MODEL, tmp_path / "lung.onnx")
    assert r.exit_code == 0, r.output
    graph = onnx.load(tmp_path / "lung.onnx").graph
    assert {n.op_type for n in graph.node} == {"Conv", "Relu", "MaxPool", "ConvTranspose", "Concat", "Cast"}
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 1, 256, 256]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)  # the checkpoint's float16
    session = ort.InferenceSession(tmp_path / "lung.onnx", providers=["CPUExecutionProvider"])
    x = sample_images()
    got = np.concatenate([session.run(["logits"], {"image": x[i : i + 1]})[0] for i in range(len(x))])
    want = load_checkpoint(LUNG_MODEL).build_model("numpy").forward(x)
    assert got.shape == want.shape == (3, 1, 256, 256) and got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= LOGIT_TOLERANCE * np.abs(want).max(), err
    lungs = want > 0  # sigmoid(logit) > 0.5, the shipped model's threshold
    assert np.array_equal(got > 0, lungs) and 0.1 < lungs.mean() < 0.6


@needs_ort
def test_onnx_dynamic_sigmoid_graph_takes_any_batch_and_size(tmp_path):
    import onnx
    import onnxruntime as ort

    model = random_checkpoint(tmp_path / "c.npz")
    r = run("export", tmp_path / "c.npz", tmp_path / "m.onnx", "--float32", "--dynamic", "--sigmoid")
    assert r.exit_code == 0, r.output
    m = onnx.load(tmp_path / "m.onnx")
    assert [n.op_type for n in m.graph.node][-1] == "Sigmoid" and "Cast" not in {n.op_type for n in m.graph.node}
    assert [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == ["N", 1, "H", "W"]
    assert json.loads({p.key: p.value for p in m.metadata_props}["minunet"])["model"]["depth"] == 2
    about = json.loads((tmp_path / "m.json").read_text())["files"]["m.onnx"]
    assert about["output_name"] == "probability" and about["input_shape"] == ["N", 1, "H", "W"]
    session = ort.InferenceSession(tmp_path / "m.onnx", providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in ((2, 1, 32, 32), (3, 1, 16, 48)):
        x = rng.random(shape, dtype=np.float32)
        got = session.run(["probability"], {"image": x})[0]
        want = model.predict_proba(x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_TOLERANCE)  # probabilities: a scale of 1
