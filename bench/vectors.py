"""Vector search at scale: latency and recall@10 of the store's index against exact search.

    python -m bench.vectors --n 100000 --engine lite                               # Milvus Lite (a file)
    .venv-milvus/bin/milvus-server --data /tmp/m --proxy-port 19531 &               # the real engine
    python -m bench.vectors --n 1000000 --engine server --uri http://127.0.0.1:19531

Synthetic unit vectors of a served dimension (--dim: 128 for embedder version 2, the served
default; 1280 for version 1), clustered like descriptors are
(--clusters Gaussian clusters around random centres; uniform random vectors are the
worst case of any ANN index and say little about real catalogs), written in chunks
through pymilvus into a collection made the way `VectorStore` makes catalogs (HNSW,
M=16, efConstruction=200, IP). Queries are database vectors plus noise (a new photo of
a stored object). The exact top 10 is computed by brute force, chunk by chunk as the
data is generated (so the benchmark never holds all vectors at once). Then, per ef:
p50/p99 of single-query searches (limit 10, Bounded consistency: docs/PERFORMANCE.md)
and recall@10 against the exact top 10. Prints a markdown table; --out writes result.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def chunk(seed: int, i: int, size: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    """Chunk i of the database, the same on every call (seeded by chunk)."""
    rng = np.random.default_rng([seed, i])
    c = centres[rng.integers(0, len(centres), size)]
    v = c + spread * rng.standard_normal((size, dim)).astype(np.float32) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def merge_top(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, offset: int, k: int):
    """Merge a chunk's scores [q, c] into the running top k (scores and global ids)."""
    part = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], 1)
    ids = np.concatenate([best_i, part + offset], 1)
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)


def run(n: int, dim: int, engine: str, uri: str, queries: int, efs: list[int], clusters: int, spread: float,
        chunk_size: int, out: Path | None, progress=None, seed: int = 0, reuse: str = "", keep: bool = False) -> dict:
    from pymilvus import DataType, MilvusClient

    from bench.common import write_result

    progress = progress or (lambda m: print(m, flush=True))

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    tmp = None
    if engine == "lite":
        tmp = tempfile.TemporaryDirectory()
        uri = str(Path(tmp.name) / "bench.db")
    client = MilvusClient(uri)
    name = reuse or f"bench_vectors_{int(time.time())}"
    if not reuse:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 200})
        client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")

    # Queries: database vectors (from chunks spread over the whole range) plus noise.
    n_chunks = (n + chunk_size - 1) // chunk_size
    picks = rng.integers(0, n, queries)
    q = np.empty((queries, dim), np.float32)
    best_s = np.full((queries, 10), -np.inf, np.float32)
    best_i = np.zeros((queries, 10), np.int64)
    t_insert = time.perf_counter()
    for ci in range(n_chunks):
        size = min(chunk_size, n - ci * chunk_size)
        x = chunk(seed, ci, size, dim, centres, spread)
        mine = (picks >= ci * chunk_size) & (picks < ci * chunk_size + size)
        for qi in np.flatnonzero(mine):
            v = x[picks[qi] - ci * chunk_size] + 0.5 * spread * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
            q[qi] = v / np.linalg.norm(v)
        for s in range(0, size if not reuse else 0, 2000):
            client.insert(name, [{"id": ci * chunk_size + s + j, "vector": row} for j, row in enumerate(x[s:s + 2000].tolist())])
        progress(f"inserted {ci * chunk_size + size}/{n} ({time.perf_counter() - t_insert:.0f} s)")
    insert_s = time.perf_counter() - t_insert
    # Exact top 10 by brute force, chunk by chunk (regenerated, same seeds).
    t = time.perf_counter()
    for ci in range(n_chunks):
        size = min(chunk_size, n - ci * chunk_size)
        best_s, best_i = merge_top(best_s, best_i, q @ chunk(seed, ci, size, dim, centres, spread).T, ci * chunk_size, 10)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    client.flush(name)
    # The index covers every row before anything is timed. (A server then keeps re-indexing the
    # segments its compaction merges, `pending_index_rows`, serving the indexed ones meanwhile:
    # at 1M that is as long again, and searches run beside it.)
    while True:
        info = client.describe_index(name, "vector")
        if int(info.get("indexed_rows", 0)) >= n:
            break
        progress(f"indexing: {info.get('indexed_rows')}/{n}")
        time.sleep(10)
    if not reuse:
        client.release_collection(name)
    client.load_collection(name)
    index_s = time.perf_counter() - t
    progress(f"indexed and loaded in {index_s:.0f} s")
    rows = []
    for ef in efs:
        params = {"metric_type": "IP", "params": {"ef": ef}}
        for v in q[:5]:
            client.search(name, data=[v.tolist()], limit=10, search_params=params, consistency_level="Bounded")
        lat, recall = [], []
        for qi, v in enumerate(q):
            t = time.perf_counter()
            res = client.search(name, data=[v.tolist()], limit=10, search_params=params, consistency_level="Bounded")
            lat.append((time.perf_counter() - t) * 1000)
            got = {int(h["id"]) for h in res[0]}
            recall.append(len(got & set(best_i[qi].tolist())) / 10)
        rows.append({"ef": ef, "p50_ms": round(float(np.percentile(lat, 50)), 2),
                     "p99_ms": round(float(np.percentile(lat, 99)), 2), "recall@10": round(float(np.mean(recall)), 4)})
        progress(f"ef {ef}: {rows[-1]}")
    if not keep:
        client.drop_collection(name)
    client.close()
    if tmp is not None:
        tmp.cleanup()
    result = {"engine": "Milvus Lite" if engine == "lite" else f"Milvus server {uri}", "n": n, "dim": dim,
              "reused_collection": reuse,
              "index": "HNSW M=16 efConstruction=200, IP", "clusters": clusters, "spread": spread, "queries": queries,
              "insert_s": round(insert_s, 1), "index_and_load_s": round(index_s, 1),
              "exact_search_s_all_queries": round(exact_s, 1), "by_ef": rows}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['engine']}: {r['n']:,} x {r['dim']} ({r['index']}); {r['queries']} queries; insert {r['insert_s']} s, "
             f"index + load {r['index_and_load_s']} s", "", "| ef | p50 ms | p99 ms | recall@10 |", "|---:|---:|---:|---:|"]
    lines += [f"| {x['ef']} | {x['p50_ms']} | {x['p99_ms']} | {x['recall@10']} |" for x in r["by_ef"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--engine", choices=("lite", "server"), default="lite")
    ap.add_argument("--uri", default=os.environ.get("VISEARCH_MILVUS_URI", "http://127.0.0.1:19530"))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", default="64,128,256")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0, help="Noise norm relative to a unit centre.")
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="Keep the collection (to search it again with --reuse).")
    ap.add_argument("--reuse", default="", help="Search a collection an earlier run with the same --n --dim --seed "
                    "arguments kept, without writing it again.")
    args = ap.parse_args(argv)
    # Milvus Lite runs in a process this one starts: one OpenMP thread, as the mesh runs it (docs/PERFORMANCE.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    r = run(args.n, args.dim, args.engine, args.uri, args.queries, [int(e) for e in args.ef.split(",")], args.clusters,
            args.spread, args.chunk, args.out, reuse=args.reuse, keep=args.keep or bool(args.reuse))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
