"""Throughput as the mesh scales out on one machine: `python -m bench.scale [--images 400] [--seconds 15]`.

For each configuration (embedding replicas, gateway replicas, workers) it brings
a fresh mesh up, ingests the same grocery photos through the queue (images/s),
runs a bounded search load at fixed concurrency (searches/s, p50/p99), and
takes the mesh down. Prints a markdown table; --out writes it with the JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (embedding replicas, gateway replicas, workers)
    (1, 1, 1),
    (1, 1, 2),
    (2, 1, 2),
    (2, 2, 2),
    (3, 2, 3),
]


def run_config(emb: int, gw: int, workers: int, photos, queries, seconds: float, concurrency: int) -> dict:
    from bench.load import run_load
    from visearch import mesh
    from visearch.client import GatewayClient
    from visearch.demo import write_manifest
    from visearch.sdk import ingest_rows, read_manifest, wait_job

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mesh"
        state = mesh.up(data, log=lambda m: None, replicas={"embedding": emb, "gateway": gw}, workers=workers)
        try:
            key = mesh.read_admin_key(data)
            rows = read_manifest(write_manifest(photos, Path(tmp) / "m.csv"))
            with GatewayClient(state["gateway"], key=key, timeout=120) as client:
                t0 = time.monotonic()
                job_id, _ = ingest_rows(client, rows, "bench", by_path=False)
                job = wait_job(client, job_id, len(rows), quiet=True)
                ingest_s = time.monotonic() - t0
            load = run_load(state["gateway"], key, queries[0].read_bytes(), "bench", concurrency, seconds)
        finally:
            mesh.down(data, log=lambda m: None)
    return {"embedding": emb, "gateway": gw, "workers": workers, "images": job.done,
            "ingest_img_per_s": round(job.done / ingest_s, 1), "search_per_s": load["ok_per_s"],
            "search_p50_ms": load["p50_ms"], "search_p99_ms": load["p99_ms"], "codes": load["codes"]}


def main() -> None:
    from visearch.datasets import grocery_root, grocery_split

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--configs", default=",".join("x".join(map(str, c)) for c in CONFIGS),
                    help="comma-separated EMBxGWxWORKERS, e.g. 1x1x1,2x1x2")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    root = grocery_root()
    photos = grocery_split(root, "train")[: a.images]
    queries = [p.path for p in grocery_split(root, "val") if p.is_product]
    rows = []
    for spec in a.configs.split(","):
        emb, gw, workers = (int(x) for x in spec.split("x"))
        r = run_config(emb, gw, workers, photos, queries, a.seconds, a.concurrency)
        print(json.dumps(r), flush=True)
        rows.append(r)
    table = ["| embedding | gateway | workers | ingest img/s | searches/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['embedding']} | {r['gateway']} | {r['workers']} | {r['ingest_img_per_s']} | {r['search_per_s']} "
              f"| {r['search_p50_ms']} | {r['search_p99_ms']} |" for r in rows]
    print("\n".join(table))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
