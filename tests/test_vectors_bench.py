"""bench/vectors.py: the exact top 10 it scores against, and a small run on Milvus Lite."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_chunked_exact_top10_matches_a_full_sort():
    from bench.vectors import chunk, merge_top

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((7, 16)).astype(np.float32)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    parts = [chunk(0, i, 40, 16, centres, 1.0) for i in range(3)]
    assert np.array_equal(parts[1], chunk(0, 1, 40, 16, centres, 1.0))  # regenerated alike
    s, ids = np.full((5, 10), -np.inf, np.float32), np.zeros((5, 10), np.int64)
    for i, x in enumerate(parts):
        s, ids = merge_top(s, ids, q @ x.T, 40 * i, 10)
    full = q @ np.concatenate(parts).T
    assert np.array_equal(np.sort(ids, 1), np.sort(np.argsort(-full, 1)[:, :10], 1))


@pytest.mark.integration  # starts Milvus Lite
def test_vectors_benchmark_smoke_on_milvus_lite(tmp_path):
    from bench.vectors import main

    assert main(["--n", "3000", "--dim", "32", "--queries", "20", "--chunk", "1000", "--ef", "64",
                 "--clusters", "30", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["n"] == 3000 and r["engine"] == "Milvus Lite"
    (row,) = r["by_ef"]
    assert row["recall@10"] >= 0.9 and 0 < row["p50_ms"] <= row["p99_ms"], row
