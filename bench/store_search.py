"""The vector store's search as the search pipeline asks it, at several catalog sizes.

    python -m bench.store_search --sizes 10000,30000,100000 [--milvus-uri URI] --out runs/store-search

One catalog made by the store (`VectorStore.ensure_catalog`: the served index, HNSW, and the served
shape, 128-d), filled with synthetic unit vectors to each size in turn, one object per item with a
box and metadata as an ingest writes them. At each size the same query vectors are searched as
`SearchPipeline._ranked` searches: one `search_many` call of 1 or 2 views (a query's best box and
its full frame), 10 or 200 rows per view (the first rows the gateway asks for at top_k 10 with 100
re-rank candidates), the item, box and metadata of each row, read Bounded as a catalog at rest is.
Without --milvus-uri it starts Milvus Lite as the mesh runs it (visearch.liteserver). Reports the
median and p99 of each shape; the rows' share is the 200-row time less the 10-row time.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import show, wait_indexed

DIM = 128
SHAPES = ((1, 10), (1, 200), (2, 10), (2, 200))  # (views, rows per view)


def start_lite(data: Path) -> tuple[subprocess.Popen, str]:
    """Milvus Lite as the mesh runs it, on a free port; (process, URI) once it answers."""
    from visearch import liteserver
    from visearch.mesh import free_port
    from visearch.store import milvus_client

    port = free_port()
    proc = subprocess.Popen(liteserver.argv(data, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:
        try:
            milvus_client(uri, timeout=1).list_collections()
            return proc, uri
        except Exception:  # noqa: BLE001 - not listening yet
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise SystemExit(f"Milvus Lite did not start on {uri}") from None
            time.sleep(0.3)


def fill(store, gen, start: int, end: int, rng: np.random.Generator, progress) -> None:
    for first in range(start, end, 1000):
        n = min(1000, end - first)
        v = rng.standard_normal((n, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store.upsert_items(gen, [(f"item{first + i}", [(v[i], (0.1, 0.1, 0.9, 0.9))],
                                  {"shelf": str((first + i) % 31)}) for i in range(n)])
        progress(f"  {first + n}/{end} items")
    store.flush(gen)


def time_shapes(store, gen, queries: np.ndarray, repeats: int) -> dict[str, dict]:
    """Each shape's latencies, the shapes taking turns (a drift in this machine's speed reaches
    every shape alike)."""
    for views, rows in SHAPES:
        store.search_many(gen, queries[:views], rows, level="Bounded")  # warm
    ms: dict[str, list[float]] = {f"{v}x{n}": [] for v, n in SHAPES}
    got: dict[str, set[int]] = {k: set() for k in ms}
    for r in range(repeats):
        for views, rows in SHAPES:
            q = queries[(r * views) % (len(queries) - views):][:views]
            t = time.perf_counter()
            found = store.search_many(gen, q, rows, level="Bounded")
            ms[f"{views}x{rows}"].append((time.perf_counter() - t) * 1000)
            got[f"{views}x{rows}"].update(len(f) for f in found)
    return {k: {"p50_ms": round(float(np.percentile(v, 50)), 1), "p99_ms": round(float(np.percentile(v, 99)), 1),
                "rows_per_view": sorted(got[k])} for k, v in ms.items()}


def run(sizes: list[int], milvus_uri: str = "", repeats: int = 40, progress=print) -> dict:
    from visearch.inference import ModelMeta
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((16, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc, uri = (None, milvus_uri) if milvus_uri else start_lite(Path(tmp) / "lite")
        store = VectorStore(StoreSettings(milvus_uri=uri))
        try:
            meta = ModelMeta(name="bench", version="1", input_name="x", output_name="y", input_size=32, dim=DIM)
            gen = store.ensure_catalog(f"storesearch{int(time.time())}", meta)
            result = {"store": f"Milvus server {uri}" if milvus_uri else "Milvus Lite", "index": gen.index,
                      "dim": DIM, "repeats": repeats, "sizes": {}}
            have = 0
            for size in sorted(sizes):
                fill(store, gen, have, size, rng, progress)
                have = size
                wait_indexed(store, gen, size, progress)
                result["sizes"][str(size)] = time_shapes(store, gen, queries, repeats)
                progress(f"{size} items: {result['sizes'][str(size)]}")
            store.client.drop_collection(gen.collection)
        finally:
            store.close()
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    return result


def markdown(r: dict) -> str:
    head = " | ".join(f"{s.replace('x', ' view(s) x ')} rows p50 / p99 ms" for s in (f"{v}x{n}" for v, n in SHAPES))
    lines = [f"{r['store']}, index {r['index']}, {r['dim']}-d, {r['repeats']} searches per shape, Bounded.", "",
             f"| items | {head} |", "|---:|" + "---:|" * len(SHAPES)]
    for size, shapes in r["sizes"].items():
        cells = " | ".join(f"{v['p50_ms']} / {v['p99_ms']}" for v in shapes.values())
        lines.append(f"| {int(size):,} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,100000", help="catalog sizes, comma-separated")
    ap.add_argument("--milvus-uri", default="", help="a Milvus server instead of Milvus Lite")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    r = run([int(s) for s in a.sizes.split(",")], a.milvus_uri, a.repeats)
    return show(a.out, r, markdown(r))


if __name__ == "__main__":
    raise SystemExit(main())
