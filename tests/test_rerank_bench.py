"""Smoke run of the re-ranking benchmark (bench/rerank_eval.py) on the served model: every method, one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from visearch import datasets

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(datasets.grocery_root() is None, reason="grocery dataset not found")
def test_rerank_benchmark_smoke(model_repo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.rerank_eval", "--model", str(model_repo),
                        "--out", str(tmp_path), "--smoke", "--threads", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    for proto in ("S", "P3", "P1"):
        rows = report["results"][proto]
        assert set(rows) == {"global", "regions", "qam", "qe", "dba"}
        for v in rows.values():
            assert 0 <= v["mAP"] <= 1 and v["n_queries"] == 4
    assert report["storage"]["bytes_per_item_float32"] > report["storage"]["global_bytes_per_item"]
    assert set(report["ingestion_ms_per_image"]) == {"embeddings", "all", "all+regions"}
    assert (tmp_path / "examples-S.jpg").stat().st_size > 1000
    assert "| S | qam |" in (tmp_path / "results.md").read_text()
