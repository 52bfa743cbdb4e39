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


def test_match_rules_choose_on_the_selection_top_hits():
    """bench.match_eval's choice: per rule, the lowest threshold at which the verified top hits it
    flags over TH-mesh and TH-absent (their product left out) are right >= 95 %; of the rules, the
    one flagging more of TH-mesh's top hits."""
    from bench.match_eval import evaluate, families, match_score, rule_score, top1
    from bench.meshpath import Hit

    params = local.VerifyParams(threshold=1.15, match_on="fused", weight=0.1, cap=40)
    fine = {f"a{i}": 1 for i in range(3)} | {f"b{i}": 2 for i in range(3)}

    def hit(item, fused, similarity, inliers=0):
        return Hit(item, fused, inliers >= 8, False, similarity, inliers)

    # The expansion lifts every verified top hit's fused score; their own similarity tells them apart.
    present = [(1, [hit("a0", 1.2, 0.9, 40)]), (1, [hit("a1", 1.05, 0.8, 20)]), (2, [hit("b2", 1.1, 0.85, 40)])]
    absent = [(1, [hit("b0", 1.16, 0.6, 40)]), (1, [hit("b1", 0.7, 0.5)]), (2, [hit("a2", 1.0, 0.7, 12)])]
    reported = [(1, [hit("b0", 1.3, 0.75, 40)]), (2, [hit("b1", 1.1, 0.8, 40)])]
    assert match_score(present[1][1][0], "evidence", params) == pytest.approx(0.85)
    r = evaluate({"TH-mesh": present, "TH-absent": absent, "P1": reported}, fine, params)
    # fused, verified top hits: 1.2 right, 1.16 wrong, 1.1 right, 1.05 right, 1.0 wrong -> only 1.2 keeps 95 %.
    assert r["rules"]["fused"]["threshold"] == pytest.approx(1.2)
    # similarity: 0.9, 0.85, 0.8 right, 0.7, 0.6 wrong -> 0.8.
    assert r["rules"]["similarity"]["threshold"] == pytest.approx(0.8)
    # evidence: 1.0, 0.95, 0.85 right, 0.73, 0.7 wrong -> 0.85. Both flag every TH-mesh top hit; the
    # first rule listed wins a tie.
    assert r["rules"]["evidence"]["threshold"] == pytest.approx(0.85)
    assert r["rules"]["similarity"]["selection_top1_coverage"] == r["rules"]["evidence"]["selection_top1_coverage"] == 1
    assert r["chosen"] == {"rule": "evidence", "threshold": pytest.approx(0.85), "selected_on": "TH-mesh + TH-absent"}
    assert top1(present, fine, rule_score("fused", params), 1.1) == {"coverage": 2 / 3, "precision": 1.0, "flagged": 2}
    rows = {(row["protocol"], row["rule"]): row for row in r["rows"]}
    # Served (fused >= 1.15): the sibling with its product absent is a false match.
    assert rows[("TH-absent", "served (fused)")]["flagged"] == 1
    # P1 (evidence >= 0.85): the wrong top hit (0.75 + 0.1) is matched too; similarity >= 0.8 keeps it out.
    assert rows[("P1", "evidence (chosen)")]["flagged"] == 2 and rows[("P1", "evidence (chosen)")]["precision"] == 0.5
    assert rows[("P1", "similarity")]["flagged"] == 1 and rows[("P1", "similarity")]["precision"] == 1.0
    assert rows[("P1", "served (fused)")]["R@1"] == 0.5
    # Built from TF (--select-on TF): the same choice, named after it.
    tf = evaluate({"TF-mesh": present, "TF-absent": absent, "P1": reported}, fine, params)
    assert tf["chosen"] == {**r["chosen"], "selected_on": "TF-mesh + TF-absent"}
    assert {row["protocol"] for row in tf["rows"]} == {"TF-mesh", "TF-absent", "P1"}
    # The other forms of the decision, thresholded the same way. similarity + 0.1 x min(inliers, 40)/40
    # is the evidence rule: the same threshold and rows.
    forms = {row["form"]: row for row in families({"TH-mesh": present, "TH-absent": absent, "P1": reported}, fine)}
    ev = forms["similarity + 0.1 x min(inliers, 40)/40"]
    assert ev["threshold"] == pytest.approx(r["rules"]["evidence"]["threshold"]) and ev["selection_coverage"] == 1
    assert ev["absent_flagged"] == 0
    assert ev["reported_coverage"] == 1 and ev["reported_precision"] == 0.5
    # A stronger bonus (0.5 x min(inliers, 40)/40): right 1.4, 1.35, 1.05; wrong 1.1 (b0), 0.85 -> only 1.35
    # and above keep 95 %: two of three TH-mesh top hits.
    strong = forms["similarity + 0.5 x min(inliers, 40)/40"]
    assert strong["threshold"] == pytest.approx(1.35) and strong["selection_coverage"] == pytest.approx(2 / 3)
    # The query's floor: with one hit, evidence - a x its own similarity. a1's query gets two more hits
    # in re-ranked order, similarities 0.4 then 0.7: the floor is the lowest similarity, not the last hit's.
    lifted = [present[0], (1, [present[1][1][0], hit("b1", 0.95, 0.4), hit("b0", 0.9, 0.7)]), present[2]]
    floor = {row["form"]: row for row in families({"TH-mesh": lifted, "TH-absent": absent}, fine)}[
        "evidence - 0.5 x the lowest of its 100 candidates' similarities"]
    # a0 0.55, b2 0.525, a1 0.85 - 0.2 = 0.65 right; b0 0.4, a2 0.38 wrong -> 0.525 (with the last
    # hit's 0.7, a1 would score 0.5 and be the threshold).
    assert floor["threshold"] == pytest.approx(0.5 * 0.85 + 0.1) and floor["selection_coverage"] == 1
    assert "reported_coverage" not in floor


@pytest.mark.integration
def test_match_eval_smoke(tmp_path, model_repo, grocery):
    from bench.match_eval import FAMILIES, main

    main(["--smoke", "--model", str(model_repo), "--out", str(tmp_path)])
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["chosen"]["selected_on"] == "TH-mesh + TH-absent" and r["chosen"]["rule"] in ("fused", "evidence", "similarity")
    assert {row["protocol"] for row in r["rows"]} == {"TH-mesh", "TH-absent", "P1"}
    assert all(0 <= row["coverage"] <= 1 for row in r["rows"])
    assert (tmp_path / "curve.png").stat().st_size > 0 and "| P1 | served (similarity) |" in (tmp_path / "result.md").read_text()
    assert len(r["families"]) == len(FAMILIES) and all(0 <= f["selection_coverage"] <= 1 for f in r["families"])
    main(["--smoke", "--model", str(model_repo), "--out", str(tmp_path), "--from-hits"])  # chosen again from the hits
    assert json.loads((tmp_path / "result.json").read_text())["chosen"] == r["chosen"]
