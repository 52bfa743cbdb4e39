"""bench/verify_cost.py on two queries (the full run's numbers are in docs/VERIFY.md, "Cost")."""

from __future__ import annotations

import json


def test_verify_cost_benchmark_smoke(tmp_path, grocery):
    from bench.verify_cost import main

    assert main(["--queries", "2", "--out", str(tmp_path)]) == 0  # stops (1) if the matchers' pairs differ
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["queries"] == 2 and len(r["rows"]) == 2
    assert r["extract_ms_p50"] > 0 and r["tentative_served_ms_p50"] > 0 and r["fit_ms_p50"] > 0
    assert all(row["features"] > 100 for row in r["rows"])
    assert "tentative matches, served" in (tmp_path / "result.md").read_text()
