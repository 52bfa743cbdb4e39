""""More like this" measured: how often `similar ITEM` ranks the item's own product first.

    python -m bench.similar_eval --out runs/similar [--every 4] [--model DIR]

A fresh mesh with the defaults, `visearch ingest --wait` of every --every-th grocery train photo,
then every item that shows one of the 31 packaged products is the query of `Client.similar` (its
stored vectors and local features; the item itself is left out) with the default re-rank. The other
catalog photos of the same product are its positives: top-1 right rate (R@1), R@5, mAP@20, and how
often the top hit is flagged `match` and right. The same items are also searched by uploading their
own photo (`Client.search`, the item then finds itself first, so it is dropped from those hits) to
show what the stored-vector path gives against a re-upload. Prints a markdown table; --out writes
result.json and result.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli_env, grocery_root, show

ROOT = Path(__file__).resolve().parents[1]


def run(every: int, model: Path | None, limit: int = 0, progress=print) -> dict:
    from bench.common import mesh_up
    from visearch import datasets, mesh
    from visearch.client import Client
    from visearch.demo import item_id, write_manifest
    from visearch.metrics import match_report, retrieval_report

    root = grocery_root()
    train = datasets.grocery_split(root, "train")[::every]
    product = {item_id(p): p.fine_id for p in train}
    counts = {f: list(product.values()).count(f) for f in set(product.values())}
    queries = [p for p in train if p.is_product and counts[p.fine_id] > 1]  # with another photo to find
    queries = queries[:limit] if limit else queries
    data = Path(tempfile.mkdtemp(prefix="similar-"))
    env = cli_env(data, model)
    state = mesh_up(data, {"VISEARCH_MODEL_REPOSITORY": str(model)} if model else {})
    ranked: dict[str, list[list[str]]] = {"similar": [], "upload": []}
    hit_dicts: dict[str, list[list[dict]]] = {"similar": [], "upload": []}
    ms: dict[str, list[float]] = {"similar": [], "upload": []}
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "visearch.cli", "ingest", "--manifest",
                        str(write_manifest(train, data / "catalog.csv")), "--catalog", "shop", "--wait"],
                       env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        progress(f"ingested {len(train)} photos in {time.perf_counter() - t:.0f} s")
        with Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=300) as c:
            for n, q in enumerate(queries):
                me = item_id(q)
                for way in ("similar", "upload"):
                    t = time.perf_counter()
                    res = c.similar(me, catalog="shop", top_k=21) if way == "similar" else \
                        c.search(q.path, catalog="shop", top_k=21)
                    ms[way].append((time.perf_counter() - t) * 1000)
                    hits = [h for h in res.hits if h.item_id != me][:20]
                    ranked[way].append([h.item_id for h in hits])
                    hit_dicts[way].append([{"item_id": h.item_id, "match": h.match} for h in hits])
                if (n + 1) % 50 == 0:
                    progress(f"{n + 1}/{len(queries)} items")
    finally:
        mesh.down(data, log=lambda m: None)
    positives = [{i for i, f in product.items() if f == q.fine_id and i != item_id(q)} for q in queries]
    out = {"photos": len(train), "queries": len(queries), "every": every}
    for way in ("similar", "upload"):
        rep = retrieval_report(ranked[way], positives)
        m = match_report(hit_dicts[way], positives)
        ms_sorted = sorted(ms[way])
        out[way] = {**rep, **m, "p50_ms": round(ms_sorted[len(ms_sorted) // 2], 1)}
    return out


def markdown(r: dict) -> str:
    rows = ["| query | R@1 (own product first) | R@5 | mAP@20 | top-1 matched | match precision | p50 ms |",
            "|---|---|---|---|---|---|---|"]
    for way, label in (("similar", "`similar ITEM` (stored vectors)"), ("upload", "the item's photo uploaded")):
        x = r[way]
        rows.append(f"| {label} | {x['recall@1']:.3f} | {x['recall@5']:.3f} | {x['mAP@20']:.3f} | {x['matched_top1']:.2f} | "
                    f"{x['match_precision'] or 0:.3f} | {x['p50_ms']:g} |")
    return (f"{r['queries']} product items of a {r['photos']}-photo catalog (every {r['every']}th grocery train photo); "
            "positives: the other photos of the item's product.\n\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--every", type=int, default=4, help="every n-th train photo is in the catalog")
    ap.add_argument("--limit", type=int, default=0, help="at most this many query items (0: all product items)")
    ap.add_argument("--model", type=Path, default=None, help="model repository (default: the project's)")
    args = ap.parse_args(argv)
    r = run(args.every, args.model, args.limit)
    return show(args.out, r, markdown(r))


if __name__ == "__main__":
    raise SystemExit(main())
