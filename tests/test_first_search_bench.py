"""bench/first_search.py end to end on a few photos (the full run's numbers: docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_first_search_benchmark_smoke(tmp_path, model_repo, grocery):
    from bench.first_search import main

    assert main(["--out", str(tmp_path), "--photos", "16", "--searches", "3", "--model", str(model_repo)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert [x["ingested"] for x in r["rounds"]] == [8, 8] and [x["catalog"] for x in r["rounds"]] == [8, 16]
    for x in r["rounds"]:
        assert len(x["ms"]) == 3 and all(m > 0 for m in x["ms"])
        assert x["max_over_median"] == pytest.approx(max(x["ms"]) / x["median_ms"], abs=0.01)
