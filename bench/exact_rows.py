"""How many rows per view fix a search's re-rank candidates for certain, on a real catalog.

    python -m bench.exact_rows --protocol P1 --rows 100,130,150,200,300 --out runs/exact-rows [--smoke]

The gateway asks the store for each view's first `search.first_rows` rows (200 at top_k 10 and 100
re-rank candidates), keeps each item's best object over the views (`search.best_per_item`, with
the view and catalog crop margins) and hands the first 100 items to re-ranking. On Milvus Lite most
of a search's time is spent per row returned, so fewer rows would be cheaper. This measures whether
fewer rows could give the same candidates: with R rows per view, an object a view did not return
scores at most that view's R-th row, less the view's margin. When the 100th item's score is above
every such bound, no further row could change the first 100 (`candidates_exact`): R rows are then
provably enough, and a search could stop there. For each R the share of queries for which that
holds, and the share whose candidates at the served rows equal those of an exhaustive search.

The catalog is ingested and the queries prepared as the mesh does (bench.meshpath: the services'
own models and decisions, the served defaults); the search is exact inner products over every
stored object. `--smoke`: a few queries and a small catalog (CI).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from bench.common import show
from visearch import datasets, search
from visearch.settings import GatewaySettings, WorkerSettings

G = GatewaySettings.model_fields


def candidates_exact(results: Sequence[Sequence], margins: Sequence[float], crop_margin: float, rows: int,
                     n_candidates: int) -> bool:
    """Whether each view's first `rows` rows (`results`) fix the first `n_candidates` items of
    `search.best_per_item` for certain: a view that returned fewer rows than asked returned all it
    has, and a row a view did not return scores at most its last row less the view's margin (a
    catalog crop only lowers it further)."""
    best = list(search.best_per_item(results, margins, crop_margin).values())
    bounds = [r[-1].score - m for r, m in zip(results, margins, strict=True) if len(r) >= rows]
    if not bounds:
        return True
    return len(best) >= n_candidates and best[n_candidates - 1][0] > max(bounds)


def chosen_ids(mp, q: dict, rows: int, n_candidates: int, query_margin: float, crop_margin: float) -> list[str]:
    results = [mp._rows(v, rows) for v in q["vecs"]]
    best = search.best_per_item(results, search.view_margins(q["views"], q["full"], query_margin), crop_margin)
    return [o.object_id for _, o in search.candidates(best, 0, n_candidates)]


async def measure(protocol: str, repo: Path, rows_list: list[int], smoke: bool = False, progress=print) -> dict:
    from bench.meshpath import MeshPath
    from bench.policy_eval import smoke_catalog

    query_margin, crop_margin = G["query_crop_margin"].default, G["catalog_crop_margin"].default
    n_candidates = G["rerank_candidates"].default
    served = search.first_rows(10, n_candidates)
    root = datasets.grocery_root()
    queries = [p for p in datasets.grocery_split(root, "val") if p.is_product]
    database = datasets.grocery_split(root, "train") if protocol == "P1" else datasets.grocery_iconic(root)
    if smoke:
        queries = queries[::max(1, len(queries) // 4)][:4]
        database = smoke_catalog(queries, database)
        n_candidates, served = 4, 8
    worker = WorkerSettings.model_fields
    mp = MeshPath(repo, worker["ingest_objects"].default, worker["ingest_max_objects"].default,
                  G["query_objects"].default, "qe")
    try:
        await mp.ingest(database)
        prepared = [await mp.prepare(q.path) for q in queries]
    finally:
        await mp.close()
    progress(f"{len(mp.objects)} objects of {len(database)} photos; {len(prepared)} queries")
    shares = {}
    for rows in rows_list:
        exact = 0
        for q in prepared:
            margins = search.view_margins(q["views"], q["full"], query_margin)
            exact += candidates_exact([mp._rows(v, rows) for v in q["vecs"]], margins, crop_margin, rows,
                                      n_candidates)
        shares[str(rows)] = round(exact / len(prepared), 3)
        progress(f"{rows} rows per view: exact for {shares[str(rows)]:.3f} of the queries")
    everything = len(mp.objects)
    same = sum(chosen_ids(mp, q, served, n_candidates, query_margin, crop_margin)
               == chosen_ids(mp, q, everything, n_candidates, query_margin, crop_margin) for q in prepared)
    return {"protocol": protocol, "model": str(repo), "objects": len(mp.objects), "photos": len(database),
            "queries": len(prepared), "candidates": n_candidates, "served_rows": served,
            "exact_share_by_rows": shares, "served_rows_equal_exhaustive": round(same / len(prepared), 3)}


def markdown(r: dict) -> str:
    lines = [f"{r['protocol']}: {r['queries']} queries, a catalog of {r['photos']} photos ({r['objects']} objects), "
             f"{r['candidates']} re-rank candidates.", "",
             "| rows per view | queries whose candidates are provably fixed |", "|---:|---:|"]
    lines += [f"| {rows} | {share:.3f} |" for rows, share in r["exact_share_by_rows"].items()]
    lines += ["", f"Candidates at the served {r['served_rows']} rows equal an exhaustive search's for "
                  f"{r['served_rows_equal_exhaustive']:.3f} of the queries."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", default="P1", choices=("P1", "P3"))
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--rows", default="100,130,150,200,300", help="rows per view, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="a few queries and a small catalog (CI)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    r = asyncio.run(measure(a.protocol, a.model, [int(x) for x in a.rows.split(",")], a.smoke))
    return show(a.out, r, markdown(r))


if __name__ == "__main__":
    raise SystemExit(main())
