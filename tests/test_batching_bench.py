"""bench/batching.py on two batch sizes (the full curve is in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.mesh


def test_batching_benchmark_smoke(tmp_path):
    from bench.batching import main

    assert main(["--sizes", "1,2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert set(r["curves"]) == {"detector", "embedder", "embedder+regions", "embedding service"}
    for curve in r["curves"].values():
        assert set(curve) == {"1", "2"}
        for point in curve.values():
            assert point["ms"] > 0 and point["images_per_s"] == pytest.approx(
                1000 * (1 if point is curve["1"] else 2) / point["ms"], rel=0.05)
    assert (tmp_path / "curve.png").stat().st_size > 10_000
