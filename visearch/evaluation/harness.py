"""Score descriptors on retrieval protocols: rank by inner product, report mAP, mAP@20, recall@k.

    metrics = evaluate_embeddings(protocol, q, db)        # rows L2-normalised, in protocol order
    results = evaluate(embed, protocols, cache=path)      # embed(list[Path]) -> [n, D]; each image once

Numpy only (no torch): the same code scores ONNX models, torch heads and the
classic SIFT baseline. Metrics come from `visearch.metrics` (the definitions the
offline benchmark has always used): AP over the whole ranking, AP@20 normalised
by min(#positives, 20), recall@k = share of queries with a positive in the top k.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visearch.metrics import average_precision

from .protocol import Protocol

KS = (1, 5, 10)
MAP_AT = 20


def _check(protocol: Protocol, q: np.ndarray, db: np.ndarray) -> None:
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"{protocol.name}: query {q.shape} and database {db.shape} descriptors do not match")
    if len(q) != len(protocol.queries) or len(db) != len(protocol.database):
        raise ValueError(f"{protocol.name}: {len(q)} query / {len(db)} database rows for "
                         f"{len(protocol.queries)} queries / {len(protocol.database)} database photos")


def rank(q: np.ndarray, db: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(order [nq, top], scores [nq, top]): database indexes by decreasing inner product (stable on ties)."""
    scores = np.asarray(q, np.float32) @ np.asarray(db, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")
    if top is not None:
        order = order[:, :top]
    return order, np.take_along_axis(scores, order, axis=1)


def relevance(protocol: Protocol, order: np.ndarray) -> list[np.ndarray]:
    """Per query, a boolean array: is the result at each rank relevant."""
    out = []
    for qi, row in enumerate(order):
        pos = np.zeros(len(protocol.database), bool)
        pos[list(protocol.positives(protocol.queries[qi]))] = True
        out.append(pos[row])
    return out


def evaluate_embeddings(protocol: Protocol, q: np.ndarray, db: np.ndarray) -> dict:
    """Metrics of `protocol` for query rows `q` and database rows `db` (L2-normalised, protocol order).

    Returns mAP, mAP@20, recall@1/5/10, n_queries, n_database, dim, and `ap` (per-query AP, in query order).
    """
    _check(protocol, q, db)
    for query in protocol.queries:
        if not protocol.positives(query):
            raise ValueError(f"{protocol.name}: query {query.key} has no positive in the database")
    out = order_metrics(protocol, rank(q, db)[0])
    aps = out.pop("ap")
    out.update(n_database=len(protocol.database), dim=int(q.shape[1]), ap=[round(a, 6) for a in aps])
    return out


def order_metrics(protocol: Protocol, order: np.ndarray) -> dict:
    """mAP, mAP@20, recall@1/5/10, n_queries and `ap` (per-query AP, in query order) of database
    orders, one row per query of `protocol`, best first (`rank`, or a re-ranked order)."""
    aps, aps_k, hits = [], [], {k: 0 for k in KS}
    for qi, r in enumerate(relevance(protocol, order)):
        n_pos = len(protocol.positives(protocol.queries[qi]))
        aps.append(ranked_ap(r, n_pos))
        aps_k.append(average_precision(r[:MAP_AT].tolist(), n_pos, MAP_AT))
        for k in KS:
            hits[k] += bool(r[:k].any())
    n = len(aps)
    out = {"mAP": float(np.mean(aps)), f"mAP@{MAP_AT}": float(np.mean(aps_k))}
    out.update({f"recall@{k}": hits[k] / n for k in KS})
    out.update(n_queries=n, ap=aps)
    return out


def ranked_ap(rel: np.ndarray, n_pos: int) -> float:
    """Full-ranking AP of one query from its boolean relevance by rank (`relevance`) and its number of
    positives, vectorised (equal to visearch.metrics.average_precision)."""
    ranks = np.flatnonzero(rel) + 1
    return float((np.arange(1, len(ranks) + 1) / ranks).sum() / n_pos)


def pr_curve(protocol: Protocol, q: np.ndarray, db: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision at `points` recall levels (0..1) over the queries: (recall, precision)."""
    order, _ = rank(q, db)
    levels = np.linspace(0, 1, points)
    curves = []
    for qi, r in enumerate(relevance(protocol, order)):
        n_pos = len(protocol.positives(protocol.queries[qi]))
        tp = np.cumsum(r)
        prec = tp / np.arange(1, len(r) + 1)
        rec = tp / n_pos
        interp = np.maximum.accumulate(prec[::-1])[::-1]  # precision envelope
        idx = np.searchsorted(rec, levels, side="left")
        curves.append(np.where(idx < len(r), interp[np.minimum(idx, len(r) - 1)], 0.0))
    return levels, np.mean(curves, axis=0)


def distinct_paths(protocols: dict[str, Protocol]) -> list[Path]:
    """Every image any of the protocols needs, once, in first-seen order."""
    seen: dict[Path, None] = {}
    for p in protocols.values():
        for photo in (*p.queries, *p.database):
            seen.setdefault(photo.path, None)
    return list(seen)


def embed_all(embed: Callable[[list[Path]], np.ndarray], paths: Sequence[Path], cache: Path | None = None,
              progress: Callable[[str], None] | None = None) -> dict[Path, np.ndarray]:
    """Descriptors of `paths` (path -> row), reusing and extending the .npz `cache` when given."""
    have: dict[Path, np.ndarray] = {}
    if cache is not None and Path(cache).is_file():
        data = np.load(cache, allow_pickle=False)
        have = {Path(k): v for k, v in zip(data["keys"].tolist(), data["emb"], strict=True)}
    missing = [p for p in paths if p not in have]
    if missing:
        if progress:
            progress(f"embedding {len(missing)} images" + (f" ({len(paths) - len(missing)} cached)" if have else ""))
        rows = np.asarray(embed(list(missing)), np.float32)
        if rows.shape[0] != len(missing):
            raise ValueError(f"embed returned {rows.shape[0]} rows for {len(missing)} images")
        have.update(zip(missing, rows, strict=True))
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            keys = list(have)
            tmp = Path(cache).with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array([str(k) for k in keys]), emb=np.stack([have[k] for k in keys]))
            tmp.replace(cache)
    return {p: have[p] for p in paths}


def protocol_matrices(protocol: Protocol, emb: dict[Path, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([emb[p.path] for p in protocol.queries]), np.stack([emb[p.path] for p in protocol.database]))


def evaluate(embed: Callable[[list[Path]], np.ndarray], protocols: dict[str, Protocol], cache: Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Embed each distinct image of `protocols` once (through the .npz `cache` if given) and score every protocol.

    `embed(paths) -> float32 [len(paths), D]`, rows L2-normalised (they are re-normalised here
    defensively; a row of zeros stays zeros). Returns {protocol name: evaluate_embeddings(...)}.
    """
    return evaluate_all(protocols, embed_all(embed, distinct_paths(protocols), cache, progress))


def evaluate_all(protocols: dict[str, Protocol], emb: dict[Path, np.ndarray]) -> dict[str, dict]:
    """Every protocol scored on descriptors already made ({path: vector}, re-normalised here)."""
    out = {}
    for name, p in protocols.items():
        q, db = protocol_matrices(p, emb)
        out[name] = evaluate_embeddings(p, l2_normalize(q), l2_normalize(db))
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
