"""The searches right after an ingest, against the rest (docs/PERFORMANCE.md, "The first searches
after an ingest"): a fresh mesh, `visearch ingest --wait` of half the train photos, 16 val
searches timed one by one, then the other half into the same catalog and 16 more.

    python -m bench.first_search --out runs/first-search [--photos 2640] [--idle 0]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli_env, grocery_root, write_result

ROOT = Path(__file__).resolve().parents[1]


def run(photos: int, searches: int, idle: float, model: Path | None, progress=print) -> dict:
    from bench.common import mesh_up
    from visearch import datasets, mesh
    from visearch.client import Client
    from visearch.demo import write_manifest

    root = grocery_root()
    train = datasets.grocery_split(root, "train")[:photos]
    val = [p for p in datasets.grocery_split(root, "val") if p.is_product]
    data = Path(tempfile.mkdtemp(prefix="first-search-"))
    env = cli_env(data, model)

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "visearch.cli", *args], env=env, check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)

    state = mesh_up(data, {"VISEARCH_MODEL_REPOSITORY": str(model)} if model else {})
    rounds = []
    try:
        with Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=120) as c:
            for n, half in enumerate((train[0::2], train[1::2])):
                cli("ingest", "--manifest", str(write_manifest(half, data / f"half{n}.csv")), "--catalog", "shop",
                    "--wait")
                time.sleep(idle)
                ms = []
                for q in val[n * searches:(n + 1) * searches]:
                    t = time.perf_counter()
                    c.search(q.path, catalog="shop", top_k=10)
                    ms.append(round((time.perf_counter() - t) * 1000))
                med = statistics.median(ms)
                rounds.append({"ingested": len(half), "catalog": sum(r["ingested"] for r in rounds) + len(half),
                               "ms": ms, "median_ms": med, "max_over_median": round(max(ms) / med, 2)})
                progress(f"after {len(half)} photos: {ms} (max/median {rounds[-1]['max_over_median']})")
    finally:
        mesh.down(data, log=lambda m: None)
    return {"photos": len(train), "idle_s": idle, "rounds": rounds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--photos", type=int, default=2640, help="train photos ingested in all (two halves)")
    ap.add_argument("--searches", type=int, default=16, help="searches timed after each half")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds between the ingest and the searches")
    ap.add_argument("--model", type=Path, default=None, help="model repository (default: the project's)")
    args = ap.parse_args(argv)
    r = run(args.photos, args.searches, args.idle, args.model)
    rows = "\n".join(f"| {x['ingested']} | {x['catalog']} | {x['median_ms']:g} | {max(x['ms'])} | {x['max_over_median']} |"
                     for x in r["rounds"])
    write_result(args.out, r, "| ingested | catalog | median ms | max ms | max / median |\n|---|---|---|---|---|\n"
                 + rows + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
