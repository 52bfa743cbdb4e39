"""Smoke runs of the detector's fine-tuning and of the detection benchmark (full runs: docs/DETECTION.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visearch import datasets

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(datasets.grocery_root() is None, reason="grocery dataset not found"), pytest.mark.integration]


def test_detector_fine_tuning_smoke(tmp_path):
    """A tiny run learns: held-aside box AP rises above the COCO model's, and the checkpoint exports."""
    from visearch.modeling.detector_build import build_detector
    from visearch.training import detector as train_det

    meta = train_det.train(tmp_path / "run", n_train=64, n_val=16, epochs=3, batch=16, lr=3e-3,
                           data_dir=tmp_path / "scenes", log=lambda m: None)
    assert meta["val_ap50"] > meta["coco_val_ap50"], meta
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert len(history) == 3 and history[-1]["box_loss"] < history[0]["box_loss"]
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["labels"] == ["background", "object"]
    repo = tmp_path / "repo"
    (repo / "detector").mkdir(parents=True)
    (repo / "detector" / "config.pbtxt").write_text((ROOT / "model_repository" / "detector" / "config.pbtxt").read_text())
    out = build_detector(repo, progress=lambda m: None, checkpoint=tmp_path / "run" / "best.pt")
    assert out["version"] == 2 and out["labels"] == ["background", "object"] and out["parity_max_abs_diff"] < 1e-3
    assert (repo / "detector" / "2" / "model.onnx").is_file()


def test_detection_benchmark_smoke(model_repo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.detect_eval", "--model", str(model_repo), "--out",
                        str(tmp_path), "--smoke", "--versions", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    (name,) = report["detectors"]
    assert 0 <= report["box_ap"][name]["AP50"] <= 1 and report["box_ap"][name]["scenes"] == 12
    rows = report["object_in_scene"]
    assert set(rows) == {"full frame", f"best box: {name}", f"both (max): {name}", f"best if small: {name}", "crop: true box"}
    assert all(v["n_queries"] == 6 for v in rows.values())
    assert set(report["ms_per_image"]) == {name, "embedding"}
    assert (tmp_path / "examples.jpg").stat().st_size > 1000
    assert "| O | crop: true box |" in (tmp_path / "results.md").read_text()
