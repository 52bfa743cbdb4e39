"""bench/batch_search.py end to end on a few photos (the full run's numbers: docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_batch_search_benchmark_smoke(tmp_path, model_repo, grocery):
    from bench.batch_search import main

    assert main(["--out", str(tmp_path), "--photos", "24", "--queries", "4", "--rounds", "2",
                 "--model", str(model_repo)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["queries"] == 4 and len(r["one_by_one_qps"]) == len(r["batch_qps"]) == 2
    assert all(q > 0 for q in r["one_by_one_qps"] + r["batch_qps"])
    assert r["batch_over_one"] == pytest.approx(r["batch_median"] / r["one_by_one_median"], abs=0.01)
    assert r["same_top1"] == 4  # the same answers both ways
    assert "BatchSearch" in (tmp_path / "result.md").read_text()
