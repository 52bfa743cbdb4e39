"""Smoke test of bench.store_search (the store's search as the pipeline asks it): a real Milvus Lite
(visearch.liteserver), two small sizes; timings are not asserted."""

from __future__ import annotations

import pytest

from bench import store_search

pytestmark = pytest.mark.integration


def test_store_search_times_every_shape_at_every_size(tmp_path):
    r = store_search.run([150, 300], repeats=3, progress=lambda m: None)
    assert r["store"] == "Milvus Lite" and r["index"] == "hnsw" and list(r["sizes"]) == ["150", "300"]
    for size, shapes in r["sizes"].items():
        assert list(shapes) == [f"{v}x{n}" for v, n in store_search.SHAPES]
        for shape, t in shapes.items():
            rows = int(shape.split("x")[1])
            assert t["rows_per_view"] == [min(rows, int(size))], (size, shape)  # every view its rows
            assert 0 < t["p50_ms"] <= t["p99_ms"]
    table = store_search.markdown(r)
    assert "| 300 |" in table and "2 view(s) x 200 rows" in table
