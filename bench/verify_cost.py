"""The raw cost of the "verify" re-rank's steps, and the tentative matcher against the form before it.

    python -m bench.verify_cost --queries 40 --out runs/verify-cost

Per query (a grocery val photo of a product) and its 20 candidates (train photos: 5 of the same
product, 15 of others, drawn with a fixed seed; features stored as ingestion stores them): the
query's local features (visearch.local at the queries' side), the tentative matches of the 20
pairs by the served `local.tentative` and by `reference` (the form before it: the second nearest
distance by a partition of each row), and fitting the geometry on the served matches. The two
matchers run one after the other on each query, in alternating order, on one thread, and must give
the same pairs: the benchmark stops if they do not.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import grocery_root, show, stored_local_features

CANDIDATES = 20
SAME = 5  # candidates showing the query's product


def reference(q, c, ratio: float = 0.9) -> np.ndarray:
    """`local.tentative` for float descriptors as it was until stop 40 (a partition for the two
    nearest distances)."""
    if len(q) < 2 or len(c) < 2:
        return np.zeros((0, 2), np.int64)
    a, b = q.desc.astype(np.float32), c.desc.astype(np.float32)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(d2, 0.0, out=d2)
    best = d2.argmin(axis=1)
    two = np.partition(d2, 1, axis=1)[:, :2]
    rows = np.arange(len(a))
    keep = (two[:, 0] <= ratio * ratio * two[:, 1]) & (d2.argmin(axis=0)[best] == rows)
    return np.stack([rows[keep], best[keep]], axis=1).astype(np.int64)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # as the mesh's services run their BLAS (visearch.mesh)
        return _run(args)


def _run(args) -> int:
    from visearch import datasets, local
    from visearch.imaging import decode_image

    root = grocery_root()
    train = [p for p in datasets.grocery_split(root, "train") if p.is_product]
    val = [p for p in datasets.grocery_split(root, "val") if p.is_product]
    rng = np.random.default_rng(args.seed)
    queries = [val[i] for i in sorted(rng.choice(len(val), min(args.queries, len(val)), replace=False))]
    query_extractor = local.RootSift(max_side=local.QUERY_SIDE)
    stored = functools.cache(stored_local_features)

    rows: list[dict] = []
    for k, qp in enumerate(queries):
        same = [p for p in train if p.fine_id == qp.fine_id]
        other = [p for p in train if p.fine_id != qp.fine_id]
        picked = [same[i] for i in rng.choice(len(same), min(SAME, len(same)), replace=False)]
        picked += [other[i] for i in rng.choice(len(other), CANDIDATES - len(picked), replace=False)]
        cands = [stored(p.path) for p in picked]
        image = np.asarray(decode_image(qp.path.read_bytes()))
        t0 = time.perf_counter()
        q = query_extractor(image)
        extract = _ms(t0)
        timed: dict[str, float] = {}
        answers: dict[str, list] = {}
        for name in (("served", "reference") if k % 2 == 0 else ("reference", "served")):
            fn = local.tentative if name == "served" else reference
            t0 = time.perf_counter()
            answers[name] = [fn(q, c) for c in cands]
            timed[name] = _ms(t0)
        for a, b in zip(answers["served"], answers["reference"], strict=True):
            if a.shape != b.shape or not (a == b).all():
                print(f"{qp.path.name}: the served matcher's pairs differ from the reference's", file=sys.stderr)
                return 1
        t0 = time.perf_counter()
        checks = [local.verify(q, c, pairs=p) for c, p in zip(cands, answers["served"], strict=True)]
        fit = _ms(t0)
        rows.append({"query": qp.path.name, "features": len(q), "extract_ms": extract,
                     "tentative_reference_ms": timed["reference"], "tentative_served_ms": timed["served"],
                     "fit_ms": fit, "verified": sum(v.inliers >= local.VerifyParams().min_inliers for v in checks)})
        print(f"[{k + 1}/{len(queries)}] {qp.path.name}: {len(q)} features, tentative {timed['reference']:.1f} -> "
              f"{timed['served']:.1f} ms, fit {fit:.1f} ms", flush=True)

    def p50(key: str) -> float:
        return round(float(np.median([r[key] for r in rows])), 2)

    result = {"queries": len(rows), "candidates": CANDIDATES, "seed": args.seed,
              "query_features_p50": p50("features"), "extract_ms_p50": p50("extract_ms"),
              "tentative_reference_ms_p50": p50("tentative_reference_ms"),
              "tentative_served_ms_p50": p50("tentative_served_ms"), "fit_ms_p50": p50("fit_ms"),
              "rows": rows}
    ratio = result["tentative_reference_ms_p50"] / max(result["tentative_served_ms_p50"], 1e-9)
    result["tentative_speedup"] = round(ratio, 2)
    md = (f"# Raw cost of verification ({len(rows)} queries x {CANDIDATES} candidates, one thread, p50)\n\n"
          "| step | ms |\n|---|---:|\n"
          f"| the query's local features ({result['query_features_p50']:.0f} at {local.QUERY_SIDE} px) | "
          f"{result['extract_ms_p50']} |\n"
          f"| tentative matches, reference (partition) | {result['tentative_reference_ms_p50']} |\n"
          f"| tentative matches, served | {result['tentative_served_ms_p50']} ({ratio:.2f}x faster, the same pairs) |\n"
          f"| geometry fitted on the 20 | {result['fit_ms_p50']} |\n")
    return show(args.out, result, md)


if __name__ == "__main__":
    sys.exit(main())
