"""bench/ingest.py end to end on a few photos (the full run's numbers are in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_ingest_benchmark_smoke(tmp_path):
    from bench.ingest import main

    assert main(["--images", "12", "--rounds", "2", "--workers", "2", "--warm-up", "8", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["images"] == 12 and r["failed"] == 0 and r["workers"] == 2, r
    # detected boxes + the full frame: at least one object per photo, at most 1 + ingest_max_objects
    assert 12 <= r["objects"] <= 12 * 4 and r["objects_per_image"] == pytest.approx(r["objects"] / 12, abs=0.01)
    raw = r["raw_images_per_s"]
    assert raw["embed_only"] > raw["same_forwards"] > 0, "the detector and more crops cost more than one frame"
    assert r["mesh_over_raw"] == pytest.approx(r["mesh_images_per_s"] / raw["same_forwards"], rel=0.02)
    # Two rounds on disjoint halves, in alternating order; the first round's raw side runs the
    # crops the mesh stored in it, the second's (raw first) the rate of the first.
    first, second = r["rounds"]
    assert (first["order"], second["order"]) == ("mesh then raw", "raw then mesh")
    assert first["mesh"]["images"] == second["mesh"]["images"] == 6
    assert first["raw"]["crops"] == first["mesh"]["objects"]
    assert second["raw"]["crops"] == round(6 * first["mesh"]["objects"] / 6)
    assert r["objects"] == first["mesh"]["objects"] + second["mesh"]["objects"]
    cpu = r["cpu_seconds_by_component"]
    assert cpu["embedding"] > 0 and cpu["detection"] > 0, cpu
    assert sum(v for k, v in cpu.items() if k.startswith("worker")) > 0, cpu
    md = (tmp_path / "result.md").read_text()
    assert "raw: detector + embedder (with regions)" in md and "| 2 (raw then mesh) | 6 |" in md


def test_ingest_benchmark_one_frame_per_photo_is_raw_embedding_itself(tmp_path):
    """With one full frame per photo and no regions the same forwards are raw batched embedding:
    run once, and both rounds know their crop count beforehand."""
    from bench.ingest import main

    assert main(["--images", "8", "--rounds", "2", "--objects", "full", "--no-regions", "--warm-up", "4",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["objects"] == r["images"] == 8 and r["failed"] == 0
    assert all(x["raw"]["crops"] == 4 and x["raw"]["embed_only"] == x["raw"]["same_forwards"] for x in r["rounds"])
    cpu = r["cpu_seconds_by_component"]
    assert cpu.get("detection", 0.0) < cpu["embedding"] / 10, "no detection call with ingest_objects=full"


def test_local_features_ingest_benchmark_smoke(tmp_path):
    """bench/ingest_local.py: two meshes side by side, only one of them storing local features."""
    from bench.ingest_local import main

    assert main(["--images", "6", "--rounds", "2", "--warm-up", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    with_, without = r["with"], r["without"]
    assert with_["images"] == without["images"] == 6 and with_["failed"] == without["failed"] == 0, r
    # The same photos, the same detector: the same objects on both sides.
    assert with_["objects"] == without["objects"] >= 6
    # One file per object that has features, none when the setting is off, within the 8 KB budget.
    assert 6 <= with_["local_files"] <= with_["objects"] and without["local_files"] == 0, r
    assert 0 < with_["local_bytes_per_object"] <= 8192
    first, second = r["rounds"]
    assert (first["order"], second["order"]) == ("with then without", "without then with")
    assert r["without_over_with"] == pytest.approx(without["images_per_s"] / with_["images_per_s"], rel=0.01)
    assert "| **pooled** | 6 |" in (tmp_path / "result.md").read_text()
