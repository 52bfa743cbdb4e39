"""The evaluation harness: metrics on hand-made rankings, the protocols on the real dataset, `visearch eval --smoke`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from visearch import datasets
from visearch.datasets import Photo
from visearch.evaluation import harness
from visearch.evaluation.protocols import CD_TEST_IDS, CD_TRAIN_IDS, Protocol, get_protocols, train_holdout
from visearch.metrics import retrieval_report

GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")


def photo(i: int, fid: int) -> Photo:
    return Photo(Path(f"/synthetic/{i}.jpg"), fid, 0, f"class{fid}", "coarse")


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def tiny():
    """2 queries, 5 database items; scores are made so the rankings are known by construction."""
    db = [photo(10 + i, fid) for i, fid in enumerate([1, 2, 1, 3, 2])]
    queries = [photo(0, 1), photo(1, 2)]
    # database item j sits at angle a_j; query 0 at angle 0 ranks db by |a_j| ascending
    angles = np.array([0.30, 0.10, 0.50, 0.20, 0.40])
    dbv = unit(np.stack([np.cos(angles), np.sin(angles)], 1))
    q = unit([[1.0, 0.0], [np.cos(0.44), np.sin(0.44)]])
    return Protocol("T", queries, db, "tiny synthetic"), q, dbv


def test_metrics_on_a_tiny_synthetic_ranking(tiny):
    p, q, db = tiny
    assert p.positives(p.queries[0]) == {0, 2} and p.positives(p.queries[1]) == {1, 4}
    order, scores = harness.rank(q, db)
    # query 0 (class 1): db order by angle 0.10, 0.20, 0.30, 0.40, 0.50 -> items 1, 3, 0, 4, 2
    assert order[0].tolist() == [1, 3, 0, 4, 2]
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    # relevant at ranks 3 and 5: AP = (1/3 + 2/5) / 2
    # query 1 (class 2, angle 0.44): |0.44 - a| -> 0.40 (4), 0.50 (2), 0.30 (0), 0.20 (3), 0.10 (1)
    assert order[1].tolist() == [4, 2, 0, 3, 1]
    # relevant at ranks 1 and 5: AP = (1 + 2/5) / 2
    m = harness.evaluate_embeddings(p, q, db)
    ap0, ap1 = (1 / 3 + 2 / 5) / 2, (1 + 2 / 5) / 2
    assert m["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert m["ap"] == pytest.approx([ap0, ap1], abs=1e-6)
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["mAP@20"] == pytest.approx(m["mAP"])  # fewer than 20 positives and results: equal
    assert m["n_queries"] == 2 and m["dim"] == 2
    # the same numbers as visearch.metrics (the definitions the offline benchmark always used)
    ref = retrieval_report([[str(j) for j in row] for row in order],
                           [{str(j) for j in p.positives(x)} for x in p.queries])
    for k in ("mAP", "mAP@20", "recall@1", "recall@5", "recall@10"):
        assert m[k] == pytest.approx(ref[k])


def test_map_at_20_is_normalised_by_min_positives_20():
    n = 30
    db = [photo(100 + i, 1 if i < 25 else 2) for i in range(n)]
    p = Protocol("K", [photo(0, 1)], db, "")
    # put 25 positives at ranks 1..5 and 26..45 via descending scores
    ranks = list(range(5)) + list(range(10, 30)) + list(range(5, 10))  # positive i at rank ranks[i]
    scores = np.zeros(n, np.float32)
    for item, r in enumerate(ranks):
        scores[item] = 1.0 - r / 100
    q = np.ones((1, 1), np.float32)
    m = harness.evaluate_embeddings(p, q, scores[:, None])
    # top 20: ranks 1..5 positive (prec 1 each), 6..10 negative, 11..20 positive: hits 6..15 at ranks 11..20
    want = (5 + sum((5 + i) / (10 + i) for i in range(1, 11))) / 20
    assert m["mAP@20"] == pytest.approx(want)


def test_pr_curve(tiny):
    p, q, db = tiny
    rec, prec = harness.pr_curve(p, q, db)
    assert rec[0] == 0 and rec[-1] == 1 and (np.diff(prec) <= 1e-12).all()
    # query 0: positives at ranks 3, 5 -> interpolated precision 0.4 at recall 1; query 1: 1 then 0.4
    assert prec[-1] == pytest.approx(0.4) and prec[0] == pytest.approx((2 / 5 + 1) / 2)
    perfect = harness.pr_curve(p, unit([[1, 0], [0, 1]]), unit([[1, 0], [0, 1], [1, 0], [-1, 0], [0, 1]]))[1]
    assert np.allclose(perfect, 1.0)


def test_evaluate_embeds_each_image_once_and_caches(tmp_path, tiny):
    p, q, db = tiny
    other = Protocol("U", p.queries, p.database[:3], "")
    vec = {x.path: v for x, v in zip([*p.queries, *p.database], [*q, *db], strict=True)}
    calls: list[list[Path]] = []

    def embed(paths):
        calls.append(list(paths))
        return np.stack([vec[x] for x in paths]) * 3.0  # not unit: evaluate re-normalises

    cache = tmp_path / "emb.npz"
    res = harness.evaluate(embed, {"T": p, "U": other}, cache=cache)
    assert len(calls) == 1 and len(calls[0]) == 7 and len(set(calls[0])) == 7
    assert res["T"]["mAP"] == pytest.approx(harness.evaluate_embeddings(p, q, db)["mAP"])
    again = harness.evaluate(embed, {"T": p, "U": other}, cache=cache)
    assert len(calls) == 1 and again["U"] == res["U"]  # all from the cache


def test_evaluate_rejects_mismatched_rows(tiny):
    p, q, db = tiny
    with pytest.raises(ValueError, match="rows"):
        harness.evaluate_embeddings(p, q[:1], db)


# --------------------------------------------------------------------------- the protocols on the real data


@needs_grocery
def test_protocol_sizes_and_disjointness():
    ps = get_protocols(GROCERY, ("P1", "P3", "CD", "TH", "TH-CD"))
    val = {p.path for p in datasets.grocery_split(GROCERY, "val")}
    p1, p3, cd = ps["P1"], ps["P3"], ps["CD"]
    assert len(p1.queries) == 100 and len(p1.database) == 2640 and len(p3.database) == 81
    assert all(q.fine_id in range(28, 59) for q in p1.queries) and all(q.path in val for q in p1.queries)
    assert p3.queries == p1.queries and all(len(p3.positives(q)) == 1 for q in p3.queries)
    assert all(len(p1.positives(q)) > 0 for q in p1.queries)
    # CD: only products 44..58 as queries, no product 28..43 in its database, nor 44..58 in its fit set
    assert cd.queries and all(q.fine_id in CD_TEST_IDS for q in cd.queries)
    assert not any(d.fine_id in CD_TRAIN_IDS for d in cd.database)
    assert not any(f.fine_id in CD_TEST_IDS for f in cd.fit)
    assert len(cd.database) == 2640 - sum(1 for d in p1.database if d.fine_id in CD_TRAIN_IDS)
    # no val photo in any train-side set; hold-outs are disjoint inside train
    for p in ps.values():
        assert not any(f.path in val for f in p.fit)
        if p.name.startswith("TH"):
            assert not any(x.path in val for x in (*p.queries, *p.database))
            assert not {x.path for x in p.queries} & {x.path for x in p.database}
            assert p.fit == p.database
    th, thcd = ps["TH"], ps["TH-CD"]
    assert 0.15 < len(th.queries) / sum(1 for d in p1.database if d.is_product) < 0.25
    assert all(q.fine_id in CD_TRAIN_IDS for q in thcd.queries)
    assert not any(x.fine_id in CD_TEST_IDS for x in (*thcd.queries, *thcd.database))
    assert [x.path for x in train_holdout(GROCERY).queries] == [x.path for x in th.queries]  # deterministic


def test_far_holdout_takes_the_rows_least_like_the_rest_of_their_group():
    """TF's rule: per group, ceil(20 %) rows leave, one at a time, the one whose best cosine to the
    rows still in is the lowest; a group of one keeps its row."""
    from visearch.evaluation.farsplit import far_holdout

    a = np.array([[1, 0, 0], [0.99, 0.1, 0], [0.98, 0, 0.2], [0, 1, 0], [0.9, 0.4, 0]], float)
    # group 0: row 3 is alone (best cosine 0.4 to row 4); with five rows ceil(0.2 * 5) = 1 leaves
    assert far_holdout(a, [0, 0, 0, 0, 0]) == [3]
    # at 40 % two leave: row 3, then among 0, 1, 2, 4 the one whose best match is the lowest: row 4
    # (0.95 to row 1; rows 0-2 match each other at >= 0.975)
    assert far_holdout(a, [0] * 5, fraction=0.4) == [3, 4]
    # groups are independent; the second group's lone row stays
    assert far_holdout(np.vstack([a, a[:1]]), [0, 0, 0, 0, 0, 1]) == [3]
    # scale does not matter (cosine)
    assert far_holdout(a * np.arange(1, 6)[:, None], [0] * 5) == [3]
    # ties go to the earlier row: two identical pairs, each row's best match is 1
    assert far_holdout(np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float), [0] * 4) == [0]


@needs_grocery
def test_tf_holds_out_a_fifth_of_each_products_train_photos_and_trains_on_the_rest():
    """The committed TF list: ceil(20 %) of each product's train photos, no val photo, disjoint from
    its database, which is every other train photo; the `far` training split trains on that database
    and selects on TF."""
    from visearch.evaluation.protocols import read_list
    from visearch.training.data import training_protocol

    tf = get_protocols(GROCERY, ("TF",))["TF"]
    train = datasets.grocery_split(GROCERY, "train")
    assert len(tf.queries) == len(read_list()) == 183
    per_product: dict[int, int] = {}
    for p in train:
        if p.is_product:
            per_product[p.fine_id] = per_product.get(p.fine_id, 0) + 1
    held: dict[int, int] = {}
    for q in tf.queries:
        held[q.fine_id] = held.get(q.fine_id, 0) + 1
    assert held == {f: math.ceil(0.2 * n) for f, n in per_product.items()}
    assert {x.path for x in tf.queries} | {x.path for x in tf.database} == {x.path for x in train}
    assert not {x.path for x in tf.queries} & {x.path for x in tf.database} and tf.fit == tf.database
    # not TH again: most of its queries are other photos
    th = get_protocols(GROCERY, ("TH",))["TH"]
    assert len({x.path for x in tf.queries} & {x.path for x in th.queries}) < len(th.queries) / 2
    photos, proto = training_protocol(GROCERY, "far")
    assert proto.name == "TF" and {x.path for x in photos} == {x.path for x in tf.database}


@needs_grocery
def test_ti_is_p3s_shape_inside_train():
    """TI: TH's queries (held-out train photos of the products) against the 81 iconic images, one positive
    each: the train-only protocol on which a choice that P3 would show is made."""
    got = get_protocols(GROCERY, ("TI", "TH", "P3"))
    ti, th, p3 = got["TI"], got["TH"], got["P3"]
    assert [x.path for x in ti.queries] == [x.path for x in th.queries]
    assert [x.path for x in ti.database] == [x.path for x in p3.database] and len(ti.database) == 81
    for q in ti.queries:
        assert sum(d.fine_id == q.fine_id for d in ti.database) == 1
    assert not {x.path for x in ti.queries} & {x.path for x in datasets.grocery_split(GROCERY, "val")}


@needs_grocery
def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocols(GROCERY, ("P2",))


# --------------------------------------------------------------------------- visearch eval --smoke, end to end


@needs_grocery
@pytest.mark.train
def test_visearch_eval_smoke_end_to_end(tmp_path):
    """The real `visearch eval` command: an ONNX model, a whitened method and the SIFT baseline, in seconds."""
    pytest.importorskip("torch")
    pytest.importorskip("cv2")
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from visearch.cli import main as cli
    from visearch.modeling import methods

    # an ONNX model to evaluate: MobileNetV2 MAC at 224, exported with normalisation + L2 inside
    head = methods.Head("mac", ("head",), methods.pooling.MAC(), params={"base_dim": 1280})
    model = methods.make_method_embedder("mobilenet_v2", 224, head)
    onnx_path = tmp_path / "mac.onnx"
    methods.export_method_onnx(model, 224, onnx_path)

    out = tmp_path / "out"
    args = ["eval", "--model", str(onnx_path), "--method", "spoc+w", "--method", "sift-vlad",
            "--arch", "mobilenet_v2", "--size", "224", "--smoke", "--out", str(out)]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for name in ("results.md", "results.json", "pr_curves.png", "examples-P1.png", "examples-P3.png", "examples-CD.png"):
        assert (out / name).stat().st_size > 100, name
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["mac", "spoc+w", "sift-vlad"]
    for r in data["rows"]:
        assert set(r["results"]) == {"P1", "P3", "CD"}
        for m in r["results"].values():
            assert 0 <= m["mAP"] <= 1 and m["n_queries"] == 3
    assert data["rows"][1]["selection"]  # hyper-parameters were chosen on the train hold-out
    md = (out / "results.md").read_text()
    assert "| spoc+w | mobilenet_v2@224 |" in md and "P1 mAP" in md
    from PIL import Image

    with Image.open(out / "examples-P1.png") as im:
        assert im.width > 300 and im.height > 150  # 3 rows of query + top 5
