"""Batch search against one search at a time: queries per second through the mesh, side by side.

    python -m bench.batch_search --out runs/batch-search [--photos 600] [--queries 64] [--rounds 3]

A fresh mesh with the defaults, `visearch ingest --wait` of --photos train photos, then in each
round the same --queries val photos searched two ways, in alternating order (so a drift of this
shared machine's speed falls on both): one Search call after another (what `visearch search` did
for many photos), and BatchSearch calls of up to 64 (what it does now: the searches run at once and
their detector and embedder forwards are merged server-side). Also checks that both ways give the
same top hit for every query. Prints a markdown table; --out writes result.json and result.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli_env, grocery_root, show

ROOT = Path(__file__).resolve().parents[1]


def run(photos: int, queries: int, rounds: int, model: Path | None, progress=print) -> dict:
    from bench.common import mesh_up
    from visearch import datasets, mesh
    from visearch.client import Client
    from visearch.demo import write_manifest

    root = grocery_root()
    train = datasets.grocery_split(root, "train")[:photos]
    val = [p for p in datasets.grocery_split(root, "val") if p.is_product][:queries]
    data = Path(tempfile.mkdtemp(prefix="batch-search-"))
    env = cli_env(data, model)
    state = mesh_up(data, {"VISEARCH_MODEL_REPOSITORY": str(model)} if model else {})
    images = [q.path.read_bytes() for q in val]
    out = {"one_by_one_qps": [], "batch_qps": [], "same_top1": 0}
    try:
        subprocess.run([sys.executable, "-m", "visearch.cli", "ingest", "--manifest",
                        str(write_manifest(train, data / "catalog.csv")), "--catalog", "shop", "--wait"],
                       env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=300) as c:
            c.search(images[0], catalog="shop")  # warm-up
            for r in range(rounds):
                for way in (("one", "batch") if r % 2 == 0 else ("batch", "one")):
                    t = time.perf_counter()
                    if way == "one":
                        singles = [c.search(img, catalog="shop", top_k=10) for img in images]
                    else:
                        batched = c.search_many(images, catalog="shop", top_k=10)
                    qps = len(images) / (time.perf_counter() - t)
                    out["one_by_one_qps" if way == "one" else "batch_qps"].append(round(qps, 2))
                    progress(f"round {r + 1} {way}: {qps:.2f} queries/s")
                errors = [b.error.message for b in batched if b.HasField("error")]
                if errors:
                    raise SystemExit(f"batched searches failed: {errors[:3]}")
                out["same_top1"] = sum(s.hits[0].item_id == b.response.hits[0].item_id
                                       for s, b in zip(singles, batched, strict=True))
    finally:
        mesh.down(data, log=lambda m: None)
    one, batch = statistics.median(out["one_by_one_qps"]), statistics.median(out["batch_qps"])
    out.update(photos=len(train), queries=len(images), rounds=rounds, one_by_one_median=one, batch_median=batch,
               batch_over_one=round(batch / one, 2))
    return out


def markdown(r: dict) -> str:
    return ("| catalog photos | queries | one by one (queries/s) | BatchSearch (queries/s) | batch / one | same top-1 |\n"
            "|---|---|---|---|---|---|\n"
            f"| {r['photos']} | {r['queries']} | {r['one_by_one_median']:g} | {r['batch_median']:g} | "
            f"{r['batch_over_one']} | {r['same_top1']}/{r['queries']} |\n\n"
            f"Rounds (median above): one by one {r['one_by_one_qps']}, batch {r['batch_qps']}.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--photos", type=int, default=600, help="train photos in the catalog")
    ap.add_argument("--queries", type=int, default=64, help="val photos searched each way per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="model repository (default: the project's)")
    args = ap.parse_args(argv)
    r = run(args.photos, args.queries, args.rounds, args.model)
    return show(args.out, r, markdown(r))


if __name__ == "__main__":
    raise SystemExit(main())
