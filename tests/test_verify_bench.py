"""Smoke runs of the verification benchmarks (their full runs' numbers are in docs/VERIFY.md): the
same code on a few queries, and what each writes."""

from __future__ import annotations

import json

import pytest

from visearch import local


@pytest.mark.integration
def test_verify_eval_smoke(tmp_path, model_repo, grocery):
    from bench.verify_eval import main

    main(["--smoke", "--model", str(model_repo), "--out", str(tmp_path), "--extractors", "rootsift,orb"])
    r = json.loads((tmp_path / "results.json").read_text())
    got = {(row["extractor"].split("@")[0], row["protocol"], row["method"]) for row in r["rows"]}
    for ext in ("rootsift-pca32", "orb"):
        for proto in ("TH", "P1", "P3", "S"):
            assert {(ext, proto, m) for m in ("global", "qe", "verify")} <= got, (ext, proto)
    params = r["params"][f"rootsift-pca32@640 query@{local.QUERY_SIDE}"]  # queries as the gateway extracts them
    assert params["selected_on"].startswith("TH") and params["min_inliers"] > 0
    assert all(0 <= row["mAP@20"] <= 1 for row in r["rows"])
    assert (tmp_path / "curve-P1.png").stat().st_size > 0 and "| rootsift" in (tmp_path / "results.md").read_text()


@pytest.mark.integration
def test_policy_eval_smoke(tmp_path, model_repo, grocery):
    from bench.policy_eval import main

    main(["--smoke", "--model", str(model_repo), "--out", str(tmp_path)])
    r = json.loads((tmp_path / "result.json").read_text())
    assert set(r["chosen"]["selected_on"]) == {"TH-mesh", "ST", "OT"}
    assert {row["protocol"] for row in r["rows"]} == {"TH-mesh", "ST", "OT", "P1", "P3", "S", "O"}
    main(["--smoke", "--model", str(model_repo), "--out", str(tmp_path), "--reselect"])  # from the saved grid
    assert json.loads((tmp_path / "result.json").read_text())["chosen"] == r["chosen"]


@pytest.mark.mesh
def test_mesh_eval_smoke(tmp_path, model_repo, grocery):
    from bench.mesh_eval import main

    main(["--smoke", "--out", str(tmp_path), "--configs", "default,full-frame", "--protocols", "P3"])
    r = json.loads((tmp_path / "result.json").read_text())
    assert [(row["protocol"], row["config"]) for row in r["rows"]] == [("P3", "default"), ("P3", "full-frame")]
    assert all(row["errors"] == 0 and row["p50_ms"] > 0 for row in r["rows"])


@pytest.mark.mesh
def test_mesh_eval_adapts_a_catalog_through_the_mesh(tmp_path, model_repo, grocery):
    """`--adapt`: the catalog is adapted with `visearch adapt --wait` and searched again, the adapted
    version written into the run's own repository of links, never into the project's."""
    from bench.mesh_eval import main
    from visearch.models.repository import versions

    before = versions(model_repo / "embedder")
    main(["--smoke", "--out", str(tmp_path), "--configs", "full-frame", "--protocols", "CD", "--adapt", "1"])
    r = json.loads((tmp_path / "result.json").read_text())
    assert [(row["protocol"], row["config"]) for row in r["rows"]] == [("CD", "full-frame"), ("CD", "full-frame+adapted")]
    assert all(row["errors"] == 0 for row in r["rows"])
    assert r["adapt"]["CD"]["job"]["phase"] == "switched"
    assert versions(model_repo / "embedder") == before
    assert len(versions(tmp_path / "repo" / "embedder")) == len(before) + 1
