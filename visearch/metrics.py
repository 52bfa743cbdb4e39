"""Retrieval metrics: average precision, mAP(@k) and recall@k over ranked result lists (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence


def average_precision(ranked_relevant: Sequence[bool], n_relevant: int, k: int | None = None) -> float:
    """AP of one ranking: mean over relevant items of the precision at their rank.

    `ranked_relevant[i]` says whether the result at rank i+1 is relevant; relevant
    items never retrieved count as precision 0. With `k`, only the top k count and
    the sum is divided by min(n_relevant, k) (AP@k).
    """
    if n_relevant <= 0:
        raise ValueError("average precision is undefined for a query without relevant items")
    ranked = list(ranked_relevant) if k is None else list(ranked_relevant)[:k]
    denom = n_relevant if k is None else min(n_relevant, k)
    hits = 0
    total = 0.0
    for rank, relevant in enumerate(ranked, 1):
        if relevant:
            hits += 1
            total += hits / rank
    if hits > n_relevant:
        raise ValueError(f"ranking holds {hits} relevant items but n_relevant is {n_relevant}")
    return total / denom


def retrieval_report(rankings: list[list[str]], positives: list[set[str]], ks: Sequence[int] = (1, 5, 10),
                     map_at: int = 20) -> dict:
    """mAP, mAP@`map_at` and recall@k (share of queries with a positive in the top k) over queries.

    `rankings[q]` is query q's result ids, best first; `positives[q]` its relevant ids.
    """
    if len(rankings) != len(positives):
        raise ValueError(f"{len(rankings)} rankings but {len(positives)} positive sets")
    if not rankings:
        raise ValueError("no queries")
    aps, aps_k = [], []
    hits = {k: 0 for k in ks}
    for q, (ranking, pos) in enumerate(zip(rankings, positives, strict=True)):
        if not pos:
            raise ValueError(f"query {q} has no positives")
        rel = [r in pos for r in ranking]
        aps.append(average_precision(rel, len(pos)))
        aps_k.append(average_precision(rel, len(pos), map_at))
        for k in ks:
            hits[k] += any(rel[:k])
    n = len(rankings)
    report = {"n_queries": n, "mAP": sum(aps) / n, f"mAP@{map_at}": sum(aps_k) / n}
    report.update({f"recall@{k}": hits[k] / n for k in ks})
    return report


def match_report(hits: list[list[dict]], positives: list[set[str]]) -> dict:
    """How the `match` flag of each query's top hit fares: `matched_top1`, the share of queries (with
    any hit) whose top hit is flagged, and `match_precision`, the share of those that are right
    (None when none is flagged). `hits[q]` is query q's hits (dicts with item_id and match)."""
    if len(hits) != len(positives):
        raise ValueError(f"{len(hits)} hit lists but {len(positives)} positive sets")
    tops = [(h[0].get("match", False), h[0]["item_id"] in pos) for h, pos in zip(hits, positives, strict=True) if h]
    flagged = [right for matched, right in tops if matched]
    return {"matched_top1": len(flagged) / max(1, len(tops)),
            "match_precision": sum(flagged) / len(flagged) if flagged else None}
