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

--index hnsw,ivf_sq8,diskann compares index kinds on one written collection: the rows are
inserted once (no index), then per kind: release, drop the index, create it, wait until it
covers every row (build time), load, and the searches at that kind's settings
(`search_settings`). On the server, --pid (or the running `milvus-server`, found in /proc)
gives the RSS of the server's process tree before the load and after it.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

INDEX_KINDS = ("hnsw", "ivf_sq8", "diskann")


def index_params(kind: str, n: int, nlist: int | None = None) -> tuple[str, dict]:
    """(Milvus index_type, build params) of an index kind for n rows (IVF: `nlist`, else ~ 4 sqrt(n))."""
    from visearch.settings import StoreSettings
    from visearch.store import index_params as store_index_params

    if kind in ("hnsw", "ivf_sq8"):  # what the store builds for a catalog (its default settings)
        nlist = nlist or 1 << max(0, round(np.log2(4 * np.sqrt(n))))  # 4096 at 1M
        return store_index_params(kind, StoreSettings.model_construct(ivf_nlist=int(min(nlist, 65536))))
    if kind == "diskann":
        return "DISKANN", {}
    raise ValueError(f"unknown index kind {kind!r} (one of {', '.join(INDEX_KINDS)})")


def search_settings(kind: str, efs: list[int] | None = None) -> list[tuple[str, int, dict]]:
    """(search parameter name, value, search params) per search setting of an index kind."""
    name, values = {"hnsw": ("ef", efs or [64, 128, 256]), "ivf_sq8": ("nprobe", [16, 32, 64]),
                    "diskann": ("search_list", [32, 64, 128])}[kind]
    return [(name, v, {"metric_type": "IP", "params": {name: v}}) for v in values]


def rss_tree_mb(pid: int, proc: Path = Path("/proc")) -> float:
    """Resident memory of a process and all its descendants (MiB), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            status = (d / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        rss[int(d.name)] = int(m.group(1)) if m else 0
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return round(total / 1024, 1)


def find_server_pid(proc: Path = Path("/proc")) -> int | None:
    """The oldest running `milvus-server` launcher (its process tree holds the engine)."""
    found = []
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"milvus-server") for a in argv[:2]):
                found.append(int(d.name))
    return min(found) if found else None


def chunk(seed: int, i: int, size: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    """Chunk i of the database, the same on every call (seeded by chunk)."""
    rng = np.random.default_rng([seed, i])
    c = centres[rng.integers(0, len(centres), size)]
    v = c + spread * rng.standard_normal((size, dim)).astype(np.float32) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def split_real(path: Path, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(database rows, query rows) of a bench.real_vectors file: `queries` rows picked at random are the
    queries (other views of their photos stay in the database, as a new photo of a stored object)."""
    x = np.load(path)["vectors"].astype(np.float32)
    if not 0 < queries < len(x):
        raise SystemExit(f"{path}: {len(x)} rows, not enough for {queries} queries")
    pick = np.random.default_rng([seed, 7]).choice(len(x), queries, replace=False)
    keep = np.ones(len(x), bool)
    keep[pick] = False
    return np.ascontiguousarray(x[keep]), x[pick]


def merge_top(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, offset: int, k: int):
    """Merge a chunk's scores [q, c] into the running top k (scores and global ids)."""
    part = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], 1)
    ids = np.concatenate([best_i, part + offset], 1)
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)


def measure(client, name: str, q: np.ndarray, best_i: np.ndarray, settings, progress) -> list[dict]:
    """p50/p99 of single-query searches and recall@10 against the exact top 10, per search setting."""
    rows = []
    for key, value, params in settings:
        for v in q[:5]:
            client.search(name, data=[v.tolist()], limit=10, search_params=params, consistency_level="Bounded")
        lat, recall = [], []
        for qi, v in enumerate(q):
            t = time.perf_counter()
            res = client.search(name, data=[v.tolist()], limit=10, search_params=params, consistency_level="Bounded")
            lat.append((time.perf_counter() - t) * 1000)
            got = {int(h["id"]) for h in res[0]}
            recall.append(len(got & set(best_i[qi].tolist())) / 10)
        rows.append({key: value, "p50_ms": round(float(np.percentile(lat, 50)), 2),
                     "p99_ms": round(float(np.percentile(lat, 99)), 2), "recall@10": round(float(np.mean(recall)), 4)})
        progress(f"{key} {value}: {rows[-1]}")
    return rows


def build_and_search(client, name: str, kind: str, n: int, q, best_i, efs, pid: int | None, progress,
                     build_timeout: float = 1800, nlist: int | None = None) -> dict:
    """Release, drop the index, create `kind`, wait until it covers n rows, load, search."""
    client.release_collection(name)
    for old in client.list_indexes(name):
        client.drop_index(name, old)
    index_type, params = index_params(kind, n, nlist)
    row = {"index": kind, "index_type": index_type, "build_params": params}
    ip = client.prepare_index_params()
    ip.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
    t = time.perf_counter()
    try:
        client.create_index(name, ip, sync=False)  # the wait below is ours, with a time limit
        while True:
            info = client.describe_index(name, "vector")
            if str(info.get("state", "")).lower().endswith("failed"):
                raise RuntimeError(f"index build failed: {info}")
            if int(info.get("indexed_rows", 0)) >= n:
                break
            if time.perf_counter() - t > build_timeout:  # a build the server keeps retrying stays InProgress
                raise TimeoutError(f"index not built after {build_timeout:.0f} s: {info} (see the server's log)")
            progress(f"{kind} indexing: {info.get('indexed_rows')}/{n} ({time.perf_counter() - t:.0f} s)")
            time.sleep(5)
        row["build_s"] = round(time.perf_counter() - t, 1)
        row["pending_index_rows_at_end"] = int(info.get("pending_index_rows", 0))
        row["rss_before_load_mb"] = rss_tree_mb(pid) if pid else None
        t = time.perf_counter()
        client.load_collection(name)
        row["load_s"] = round(time.perf_counter() - t, 1)
        time.sleep(5)
        row["rss_after_load_mb"] = rss_tree_mb(pid) if pid else None
    except Exception as e:  # noqa: BLE001 - an index kind this build cannot make is a result, not a crash
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        progress(f"{kind}: {row['error']}")
        return row
    progress(f"{kind}: built in {row['build_s']} s, loaded in {row['load_s']} s, "
             f"RSS {row['rss_before_load_mb']} -> {row['rss_after_load_mb']} MiB")
    row["by_setting"] = measure(client, name, q, best_i, search_settings(kind, efs), progress)
    return row


def run(n: int, dim: int, engine: str, uri: str, queries: int, efs: list[int], clusters: int, spread: float,
        chunk_size: int, out: Path | None, progress=None, seed: int = 0, reuse: str = "", keep: bool = False,
        indexes: list[str] | None = None, pid: int | None = None, build_timeout: float = 1800,
        nlist: int | None = None, vectors: Path | None = None) -> dict:
    from pymilvus import DataType, MilvusClient

    from bench.common import write_result

    progress = progress or (lambda m: print(m, flush=True))
    indexes = indexes or ["hnsw"]
    for kind in indexes:
        index_params(kind, n)
    compare = indexes != ["hnsw"]  # the default (one HNSW, made with the collection) is the store's way
    if compare and engine == "server" and pid is None:
        pid = find_server_pid()

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    real = held_out = None
    if vectors is not None:  # real descriptors (bench.real_vectors): `queries` rows held out as the queries
        real, held_out = split_real(vectors, queries, seed)
        n, dim = real.shape
        clusters, spread = 0, 0.0
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
        index_type, params = index_params("hnsw", n)
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        client.create_collection(name, schema=schema, index_params=None if compare else index,
                                 consistency_level="Strong")

    # Queries: database vectors (from chunks spread over the whole range) plus noise.
    n_chunks = (n + chunk_size - 1) // chunk_size
    picks = rng.integers(0, n, queries)
    q = np.empty((queries, dim), np.float32)
    best_s = np.full((queries, 10), -np.inf, np.float32)
    best_i = np.zeros((queries, 10), np.int64)
    t_insert = time.perf_counter()
    rows_of = (lambda ci, size: real[ci * chunk_size:ci * chunk_size + size]) if real is not None else \
        (lambda ci, size: chunk(seed, ci, size, dim, centres, spread))
    if held_out is not None:
        q, picks = held_out, np.full(queries, -1)
    for ci in range(n_chunks):
        size = min(chunk_size, n - ci * chunk_size)
        x = rows_of(ci, size)
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
        best_s, best_i = merge_top(best_s, best_i, q @ rows_of(ci, size).T, ci * chunk_size, 10)
    exact_s = time.perf_counter() - t
    if compare:
        t = time.perf_counter()
        client.flush(name)
        progress(f"flushed in {time.perf_counter() - t:.0f} s")
        by_index = []
        for kind in indexes:
            by_index.append(build_and_search(client, name, kind, n, q, best_i, efs, pid, progress, build_timeout,
                                             nlist))
            if out is not None:  # what finished so far, in case a later kind runs out of time
                write_result(out, {"partial": True, "n": n, "dim": dim, "clusters": clusters, "spread": spread,
                                   "queries": queries, "insert_s": round(insert_s, 1), "by_index": by_index}, "")
        index_s, rows = None, next((r["by_setting"] for r in by_index if r["index"] == "hnsw" and "by_setting" in r), [])
    else:
        by_index = None
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
        rows = measure(client, name, q, best_i, search_settings("hnsw", efs), progress)
    if not keep:
        client.drop_collection(name)
    client.close()
    if tmp is not None:
        tmp.cleanup()
    result = {"engine": "Milvus Lite" if engine == "lite" else f"Milvus server {uri}", "n": n, "dim": dim,
              "data": f"real descriptors {vectors}" if vectors is not None else "synthetic clusters",
              "reused_collection": reuse,
              "index": "HNSW M=16 efConstruction=200, IP" if not compare else ", ".join(indexes),
              "clusters": clusters, "spread": spread, "queries": queries,
              "insert_s": round(insert_s, 1), "index_and_load_s": None if index_s is None else round(index_s, 1),
              "exact_search_s_all_queries": round(exact_s, 1), "by_ef": rows}
    if compare:
        result.update(by_index=by_index, server_pid=pid)
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    head = f"{r['engine']}: {r['n']:,} x {r['dim']} {r.get('data', 'synthetic clusters')}"
    lines = [f"{head} ({r['index']}); {r['queries']} queries; insert {r['insert_s']} s, "
             f"index + load {r['index_and_load_s']} s", "", "| ef | p50 ms | p99 ms | recall@10 |", "|---:|---:|---:|---:|"]
    if "by_index" in r:
        lines = [f"{head}; {r['queries']} queries; insert {r['insert_s']} s", "",
                 "| index | build s | load s | RSS before / after load MiB | setting | recall@10 | p50 ms | p99 ms |",
                 "|---|---:|---:|---:|---|---:|---:|---:|"]
        for x in r["by_index"]:
            head = f"| {x['index_type']} {x['build_params']} "
            if "error" in x:
                lines.append(head + f"| failed: {x['error']} | | | | | | |")
                continue
            for j, y in enumerate(x["by_setting"]):
                key = next(k for k in y if k not in ("p50_ms", "p99_ms", "recall@10"))
                cells = (f"| {x['build_s']} | {x['load_s']} | {x['rss_before_load_mb']} / {x['rss_after_load_mb']} "
                         if j == 0 else "| | | ")
                lines.append((head if j == 0 else "| ") + cells +
                             f"| {key} {y[key]} | {y['recall@10']} | {y['p50_ms']} | {y['p99_ms']} |")
        return "\n".join(lines) + "\n"
    lines += [f"| {x['ef']} | {x['p50_ms']} | {x['p99_ms']} | {x['recall@10']} |" for x in r["by_ef"]]
    return "\n".join(lines) + "\n"


def plot_curves(r: dict, path: Path) -> None:
    """recall@10 against p50 per index kind (one point per search setting), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for x in r["by_index"]:
        if "by_setting" not in x:
            continue
        pts = x["by_setting"]
        key = next(k for k in pts[0] if k not in ("p50_ms", "p99_ms", "recall@10"))
        ax.plot([y["p50_ms"] for y in pts], [y["recall@10"] for y in pts], "o-", label=x["index_type"])
        for j, y in enumerate(pts):  # labels alternate below and above their points
            ax.annotate(f"{key} {y[key]}", (y["p50_ms"], y["recall@10"]), textcoords="offset points",
                        xytext=(4, -11 if j % 2 == 0 else 5), fontsize=7)
    ax.set_xlabel("p50 single-query latency (ms)")
    ax.set_ylabel("recall@10")
    real = " real descriptors" if str(r.get("data", "")).startswith("real") else ""
    ax.set_title(f"{r['n']:,} x {r['dim']}{real}, Milvus 2.3.5 standalone, 2 cores")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--index", default="hnsw", help="Index kinds, a comma list of " + ", ".join(INDEX_KINDS) +
                    ": more than the default hnsw inserts once, then builds and searches each in turn.")
    ap.add_argument("--pid", type=int, default=None, help="Server process whose tree's RSS is read "
                    "(default: the running milvus-server).")
    ap.add_argument("--build-timeout", type=float, default=1800, help="Seconds to wait for one index kind's build.")
    ap.add_argument("--plot", type=Path, default=None, help="With several --index kinds: recall@10 vs p50 PNG.")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n); the store's "
                    "ivf_sq8 catalogs use VISEARCH_IVF_NLIST, 1024, per segment).")
    ap.add_argument("--vectors", type=Path, default=None, help="Real descriptors (a bench.real_vectors .npz) "
                    "instead of synthetic ones: --n and --dim are the file's, --queries rows of it held out.")
    args = ap.parse_args(argv)
    # Milvus Lite runs in a process this one starts: one OpenMP thread, as the mesh runs it (docs/PERFORMANCE.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    r = run(args.n, args.dim, args.engine, args.uri, args.queries, [int(e) for e in args.ef.split(",")], args.clusters,
            args.spread, args.chunk, args.out, reuse=args.reuse, keep=args.keep or bool(args.reuse),
            indexes=args.index.split(","), pid=args.pid, build_timeout=args.build_timeout, nlist=args.nlist,
            vectors=args.vectors)
    print(markdown(r))
    if args.plot and "by_index" in r:
        plot_curves(r, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
