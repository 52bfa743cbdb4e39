"""bench/ingest.py end to end on a few photos (the full run's numbers are in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_ingest_benchmark_smoke(tmp_path):
    from bench.ingest import main

    assert main(["--images", "12", "--workers", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["images"] == 12 and r["failed"] == 0 and r["workers"] == 2, r
    # detected boxes + the full frame: at least one object per photo, at most 1 + ingest_max_objects
    assert 12 <= r["objects"] <= 12 * 4 and r["objects_per_image"] == pytest.approx(r["objects"] / 12, abs=0.01)
    raw = r["raw_images_per_s"]
    assert raw["embed_only"] > raw["same_forwards"] > 0, "the detector and more crops cost more than one frame"
    assert r["mesh_over_raw"] == pytest.approx(r["mesh_images_per_s"] / raw["same_forwards"], rel=0.02)
    cpu = r["cpu_seconds_by_component"]
    assert cpu["embedding"] > 0 and cpu["detection"] > 0, cpu
    assert sum(v for k, v in cpu.items() if k.startswith("worker")) > 0, cpu
    assert "raw: detector + embedder (with regions)" in (tmp_path / "result.md").read_text()
