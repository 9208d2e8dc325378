"""benchmarks/gpu_train_check.py (stage (e) of gpu_check.sh) run small on a CPU backend, so that the script
gpu_check.sh runs on a GPU is known to work before a GPU runs it."""

from __future__ import annotations

import json

from benchscripts import load_script
from minidata import make_qu


def small_run_args(tmp_path):
    """A run of 2 epochs of a tiny model on the numpy backend, its results in tmp_path/r.json."""
    return ["--data", str(tmp_path / "data"), "--backend", "numpy", "--epochs", "2", "--batch-size", "3",
            "--size", "32", "--base", "4", "--depth", "2", "--out", str(tmp_path / "runs"),
            "--json", str(tmp_path / "r.json")]


def test_it_trains_interrupts_resumes_and_reports(tmp_path, capsys):
    make_qu(tmp_path / "data", n_per_class=4)
    script = load_script("gpu_train_check")
    assert script.main(small_run_args(tmp_path)) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["statuses"] == ["done", "interrupted", "done"] and r["resume_bit_identical"] and r["resume_same_losses"]
    assert r["stop_at"] == 4  # 4 batches of 3 per epoch here (12 images, the val share taken out): mid epoch 2
    assert len(r["history"]) == 2 and r["steady_images_per_s"] > 0
    assert set(r["projected_epoch_train_s"]) == set(script.PROJECT_TO)
    printed = capsys.readouterr().out
    assert "resume: bit-identical" in printed and "21,715 images" in printed
    # gpu_check.sh's summary reads the file under its name
    (tmp_path / "r.json").rename(tmp_path / "gpu_train.json")
    load_script("gpu_bench").summary(str(tmp_path), "", "")
    text = (tmp_path / "summary.txt").read_text()
    assert "training       : done -> interrupted -> done; resume bit-identical" in text, text
    assert "one epoch of COVID-QU-Ex lung data" in text


def test_it_fails_when_the_resumed_weights_differ(tmp_path, monkeypatch):
    """The check can fail: here the resumed run continues at twice the learning rate (a change --resume
    allows), so it lands on other weights, and the script says so and exits 1."""
    import dataclasses

    make_qu(tmp_path / "data", n_per_class=4)
    script = load_script("gpu_train_check")
    real = script.train

    def resume_with_another_lr(cfg, *a, resume=False, **kw):
        return real(dataclasses.replace(cfg, lr=2 * cfg.lr) if resume else cfg, *a, resume=resume, **kw)

    monkeypatch.setattr(script, "train", resume_with_another_lr)
    assert script.main(small_run_args(tmp_path)) == 1
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["statuses"] == ["done", "interrupted", "done"] and not r["resume_bit_identical"] and r["differ"]
