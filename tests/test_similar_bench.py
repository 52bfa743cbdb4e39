"""bench/similar_eval.py end to end on a few photos (the full run's numbers: docs/SDK.md, "More like this")."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_similar_benchmark_smoke(tmp_path, model_repo, grocery):
    from bench.similar_eval import main

    assert main(["--out", str(tmp_path), "--every", "25", "--limit", "6", "--model", str(model_repo)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["queries"] == 6 and r["photos"] == len(grocery["train"][::25])
    for way in ("similar", "upload"):
        assert r[way]["n_queries"] == 6 and 0 <= r[way]["recall@1"] <= r[way]["recall@5"] <= 1
        assert r[way]["p50_ms"] > 0
    assert "`similar ITEM`" in (tmp_path / "result.md").read_text()
