"""Retrieval metrics against hand-computed values."""

import pytest

from visearch.metrics import average_precision, retrieval_report


def test_ap_full_ranking():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision([True, False, True, False], 2) == pytest.approx((1 + 2 / 3) / 2)


def test_ap_counts_unretrieved_relevant_as_zero():
    # 3 relevant, only 2 retrieved (ranks 2 and 3): (1/2 + 2/3) / 3
    assert average_precision([False, True, True], 3) == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_ap_perfect_and_empty():
    assert average_precision([True, True, False], 2) == 1.0
    assert average_precision([False, False], 4) == 0.0
    assert average_precision([], 1) == 0.0


def test_ap_at_k_divides_by_min_of_relevant_and_k():
    ranked = [False, True, True, True, True]
    # top 2 = [F, T]: (1/2) / min(5, 2)
    assert average_precision(ranked, 5, k=2) == pytest.approx(0.25)
    # top 4: (1/2 + 2/3 + 3/4) / min(4, 4)
    assert average_precision(ranked, 4, k=4) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 4)
    # k beyond the list and few relevant: divide by n_relevant
    assert average_precision([True, False, True], 2, k=10) == pytest.approx((1 + 2 / 3) / 2)


def test_ap_rejects_impossible_inputs():
    with pytest.raises(ValueError):
        average_precision([True], 0)
    with pytest.raises(ValueError):
        average_precision([True, True], 1)


def test_retrieval_report_hand_computed():
    rankings = [["a", "b", "c", "d"], ["x", "y", "z"], ["p", "q", "r"]]
    positives = [{"b", "d"}, {"x"}, {"r", "s"}]
    rep = retrieval_report(rankings, positives, ks=(1, 2, 3), map_at=2)
    ap1 = (1 / 2 + 2 / 4) / 2  # hits at ranks 2, 4
    ap2 = 1.0
    ap3 = (1 / 3) / 2  # hit at rank 3, "s" never retrieved
    assert rep["n_queries"] == 3
    assert rep["mAP"] == pytest.approx((ap1 + ap2 + ap3) / 3)
    # @2: q1 top2 [a,b] -> (1/2)/2, q2 -> 1, q3 -> 0
    assert rep["mAP@2"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert rep["recall@1"] == pytest.approx(1 / 3)
    assert rep["recall@2"] == pytest.approx(2 / 3)
    assert rep["recall@3"] == pytest.approx(1.0)


def test_retrieval_report_default_keys_and_errors():
    rep = retrieval_report([["a", "b"]], [{"a"}])
    assert set(rep) == {"n_queries", "mAP", "mAP@20", "recall@1", "recall@5", "recall@10"}
    assert rep["mAP"] == rep["recall@1"] == 1.0
    with pytest.raises(ValueError):
        retrieval_report([["a"]], [set()])
    with pytest.raises(ValueError):
        retrieval_report([["a"]], [])


def test_match_report_counts_flagged_top_hits_and_their_precision():
    from visearch.metrics import match_report

    hits = [[{"item_id": "a1", "match": True}, {"item_id": "b1", "match": False}],  # flagged, right
            [{"item_id": "b2", "match": True}],  # flagged, wrong
            [{"item_id": "a2", "match": False}, {"item_id": "a3", "match": True}],  # top not flagged
            [{"item_id": "a4"}],  # no flag at all (a re-rank that does not verify)
            []]  # a query that failed: left out
    positives = [{"a1", "a2", "a3", "a4"}] * 5
    assert match_report(hits, positives) == {"matched_top1": 0.5, "match_precision": 0.5}
    assert match_report([[{"item_id": "x", "match": False}]], [{"x"}]) == {"matched_top1": 0.0, "match_precision": None}
    with pytest.raises(ValueError, match="positive sets"):
        match_report([[]], [])
