"""bench.adapt_eval's smoke run: the adaptation measured on a few photos of a protocol, as the full
run does (real model, made-up views, the worker's fit)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.integration
def test_adapt_eval_smoke(model_repo, grocery, tmp_path):
    from bench.adapt_eval import run

    rows = run(model_repo, "1", ["TH-CD"], 2, 128, tmp_path, smoke=True, progress=lambda _: None)
    assert [r["setting"] for r in rows] == ["embedder:1 as is", "adapted, 1 view", "adapted, 2 views"]
    assert all(0.0 <= r["mAP"] <= 1.0 and r["queries"] == 4 for r in rows)
    assert rows[1]["dim"] == rows[1]["catalog"] - 1  # cut to what a catalog this small can fit
    assert {f"v{k}.npy" for k in range(2)} <= {p.name for p in (tmp_path / "TH-CD").iterdir()}
    assert json.loads((tmp_path / "result.json").read_text())["rows"] == rows
