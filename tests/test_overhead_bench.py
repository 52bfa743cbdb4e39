"""bench/overhead.py end to end on a small catalog (the full run's numbers are in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_overhead_benchmark_smoke(tmp_path):
    from bench.overhead import main

    assert main(["--catalog-size", "300", "--real", "24", "--queries", "3", "--rounds", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["catalog_items"] == 300 and r["searches"] == 3, r
    assert 0 < r["raw"]["detector_ms"] and 0 < r["raw"]["embedder_batch2_ms"] and r["search_p50_ms"] > 0
    assert r["p50_over_raw"] == pytest.approx(r["search_p50_ms"] / r["raw"]["sum_p50_ms"], rel=0.02)
    w = r["mean_ms_per_search_by_service"]
    assert {"detection", "embedding", "rerank", "gateway", "gateway_own"} <= set(w), w
    assert w["gateway"] >= max(w["detection"], w["embedding"]), "the gateway's time includes its calls"
    acc = r["accuracy"]
    assert 0 <= acc["mAP@10"] <= 1 and 0 <= acc["recall@1"] <= 1, acc
    assert r["store"] == "Milvus Lite"
    assert "gateway Search" in (tmp_path / "result.md").read_text()
    assert r["raw"]["verify_extract_ms"] > 0 and r["raw"]["verify_match_top20_ms"] > 0
    assert r["compare"]["qe"]["search_p50_ms"] > 0 and "rerank qe" in (tmp_path / "result.md").read_text()


def test_breakdown_benchmark_smoke(tmp_path):
    """bench/breakdown.py: every step of a search timed alone, and the Search, on a small catalog."""
    from bench.breakdown import STEPS, main

    assert main(["--catalog-size", "150", "--real", "12", "--queries", "2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["catalog_items"] == 150 and r["dim"] > 0 and set(r["steps"]) == set(STEPS), r
    assert all(v["p50_ms"] > 0 for v in r["steps"].values()), r["steps"]
    path = ("detect_with_embed_full", "embed_box", "vector_search", "rerank_qe")
    assert r["critical_path_p50_ms"] == pytest.approx(sum(r["steps"][k]["p50_ms"] for k in path), abs=0.2)


def test_timeline_benchmark_smoke(tmp_path):
    """bench/timeline.py: each search's spans from a traced mesh, per method; the query's local features
    are asked for only by "verify", once the detector has answered (an order, not a timing)."""
    from bench.timeline import main

    assert main(["--catalog-size", "150", "--real", "12", "--queries", "2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["catalog_items"] == 150 and set(r["steps"]) == {"verify", "qe"}, r
    verify, qe = r["steps"]["verify"], r["steps"]["qe"]
    for rows in (verify, qe):
        assert rows["gateway server Search"]["searches"] == 2 and rows["gateway server Search"]["start_ms"] == 0
        assert {"gateway client Detect", "embedding server Embed", "rerank server Rerank"} <= set(rows), rows
        # (medians: an order that holds in every search holds for them, for steps every search has)
        assert all(v["end_ms"] <= rows["gateway server Search"]["end_ms"] for v in rows.values() if v["searches"] == 2)
    assert "gateway client ExtractLocal" in verify and not any("ExtractLocal" in k for k in qe)
    assert verify["gateway client ExtractLocal"]["start_ms"] >= verify["gateway client Detect"]["end_ms"]
    assert "--rerank verify" in (tmp_path / "result.md").read_text()
