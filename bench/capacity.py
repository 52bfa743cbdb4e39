"""What a catalog of N photos needs, computed from unit costs measured on this project (docs/CAPACITY.md).

    python -m bench.capacity [--photos 10e6,100e6,1e9] [--index hnsw|ivf_sq8] [--index-result runs/vectors-index-1m/result.json]

Nothing here is measured at those sizes: every figure is a measured unit cost times a count, under
the Milvus distributed topology written below. The unit costs and where each was measured:

- objects per photo 1.86 (4,918 objects from the 2,640 grocery train photos, full frame and up to 3
  detected objects each; docs/STORAGE.md);
- bytes per object with the defaults: 878 in the vector store's memory (the 128-d vector 512, HNSW
  links 145, loaded fields about 221) and 8,064 in all (the local features, read by key, are the
  rest); `visearch catalogs --json` on the demo's catalog (docs/STORAGE.md);
- search: HNSW M 16, ef 128 at 1M x 128 on the real Milvus 2.3.5 engine, p50 4.5 ms for one query
  at a time on this 2-core box, recall@10 0.9995 (`bench.vectors --index`, --index-result); taken as
  4.5 core-ms per query per million vectors a query node holds (each segment is searched, so the
  cost grows with the vectors held, not with log n); at 10M the same setting measured 14.1 ms p50
  (at most 2.8 core-ms per million on the 2 cores, docs/CAPACITY.md), so the 1M unit is the safe side;
- search with IVF_SQ8 catalogs (`--index ivf_sq8`, nlist 1024, nprobe 32): p50 38.3 ms at 10M x 128
  (recall@10 0.972; the server re-indexing meanwhile, so an upper bound; 3.25 ms at 1M): 3.83 core-ms
  per query per million; 230 bytes a row loaded instead of HNSW's 657 (measured on a restarted server);
- the query's own work: raw forwards 89.4 ms (detector and embedder) plus 47.2 ms of verification
  on 2 cores (`bench.overhead`, docs/VERIFY.md): about 0.27 core-s per search on the CPU;
- ingestion: 10.1 photos/s on 2 cores through the whole mesh with the defaults (detection, embedding,
  local features, the store; docs/STORAGE.md): 0.198 core-s per photo; the source photo kept for
  re-embedding, 22 KB on average for the grocery photos (larger for real catalogs: --photo-bytes).

No GPU was lent to this project, so ingestion GPU-hours are not given (their CPU core-hours are).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GIB = 1024 ** 3
IVF_SQ8_CORE_MS = 3.83  # p50 at nprobe 32: 38.3 ms at 10M x 128 under re-indexing (3.25 at 1M), the safe side
UNITS = {
    "objects_per_photo": 4918 / 2640,
    "memory_bytes_per_object": 878,
    "bytes_per_object": 8064,
    "search_core_ms_per_million": 4.5,
    "query_core_s": (89.4 + 47.2) / 1000 * 2,
    "ingest_core_s_per_photo": 2 / 10.1,
    "photo_bytes": 22_073,
}
# The topology assumed (Milvus distributed, docs/CAPACITY.md): query nodes of 16 cores and 64 GiB,
# 70 % of it for loaded segments; 2 in-memory replicas (a node can be lost); segments of 1M rows.
NODE_CORES = 16
NODE_RAM_GIB = 64
RAM_USABLE = 0.7
REPLICAS = 2
SEGMENT_ROWS = 1_000_000


# Per index kind a catalog can choose (`visearch ingest --index`): the Milvus index type, the search
# setting the store uses, the bytes a row holds loaded (visearch.store.index_bytes at 128-d: HNSW 657,
# IVF_SQ8 230 measured on a restarted server) and the search cost per million rows held, measured on
# this box (docs/CAPACITY.md; IVF_SQ8: nlist 1024, nprobe 32, IVF_SQ8_CORE_MS).
def _index_bytes(kind: str) -> int:
    from visearch.settings import StoreSettings
    from visearch.store import index_bytes

    return round(index_bytes(kind, 128, StoreSettings.model_construct()))  # the store's defaults


INDEX_UNITS = {
    "hnsw": {"index_type": "HNSW", "setting": ("ef", 128), "index_bytes": _index_bytes("hnsw"),
             "search_core_ms_per_million": 4.5},
    "ivf_sq8": {"index_type": "IVF_SQ8", "setting": ("nprobe", 32), "index_bytes": _index_bytes("ivf_sq8"),
                "search_core_ms_per_million": IVF_SQ8_CORE_MS},
}


def units_from(index_result: Path | None, index: str = "hnsw") -> dict:
    """The unit costs for catalogs with `index`, the search cost read from a `bench.vectors --index`
    result when given (the row of that kind at the store's setting)."""
    units = dict(UNITS)
    kind = INDEX_UNITS[index]
    units["memory_bytes_per_object"] = UNITS["memory_bytes_per_object"] - INDEX_UNITS["hnsw"]["index_bytes"] \
        + kind["index_bytes"]
    units["search_core_ms_per_million"] = kind["search_core_ms_per_million"]
    if index_result and Path(index_result).is_file():
        res = json.loads(Path(index_result).read_text())
        row = next((r for r in res.get("by_index", []) if r.get("index_type") == kind["index_type"]), None)
        key, value = kind["setting"]
        best = next((s for s in row["by_setting"] if s.get(key) == value), None) if row else None
        if best:
            units["search_core_ms_per_million"] = best["p50_ms"] * 1_000_000 / res["n"]
    return units


def plan(photos: float, units: dict, target_qps: float = 100.0) -> dict:
    """The resources a catalog of `photos` photos needs at `target_qps` searches a second."""
    objects = photos * units["objects_per_photo"]
    memory = objects * units["memory_bytes_per_object"]  # one replica: every vector once
    per_node = NODE_RAM_GIB * GIB * RAM_USABLE
    nodes_per_replica = math.ceil(memory / per_node)
    # A query is answered by one replica, whose nodes each search the segments they hold.
    core_s_per_query = units["search_core_ms_per_million"] / 1000 * objects / 1e6
    qps_per_replica = nodes_per_replica * NODE_CORES / core_s_per_query
    replicas = max(REPLICAS, math.ceil(target_qps / qps_per_replica))
    serving_cores = target_qps * units["query_core_s"]
    stored = objects * units["bytes_per_object"] + photos * units["photo_bytes"]
    return {
        "photos": photos,
        "objects": objects,
        "vector_memory_gib_per_replica": memory / GIB,
        "nodes_per_replica": nodes_per_replica,
        "vectors_per_query_node_millions": objects / nodes_per_replica / 1e6,
        "segments": math.ceil(objects / SEGMENT_ROWS),
        "latency_ms_spread": 1000 * core_s_per_query / (nodes_per_replica * NODE_CORES),
        "search_core_s_per_query": core_s_per_query,
        "qps_per_replica": qps_per_replica,
        "target_qps": target_qps,
        "replicas": replicas,
        "query_nodes": replicas * nodes_per_replica,
        "embedding_serving_cores": serving_cores,
        "object_storage_tib": stored / 1024 ** 4,
        "ingest_core_hours": photos * units["ingest_core_s_per_photo"] / 3600,
    }


def table(rows: list[dict]) -> str:
    head = ("| catalog photos | objects | vector memory, one replica | query nodes per replica | vectors per node "
            "| segments | search core-s per query (ms spread over a replica's cores) | QPS per replica "
            "| replicas / query nodes at the target QPS "
            "| CPU cores for the queries' forwards | object storage | ingestion, CPU core-hours |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['photos']:,.0f} | {r['objects'] / 1e6:,.0f}M | {r['vector_memory_gib_per_replica']:,.0f} GiB "
            f"| {r['nodes_per_replica']:,} | {r['vectors_per_query_node_millions']:.0f}M "
            f"| {r['segments']:,} | {r['search_core_s_per_query']:.2f} ({r['latency_ms_spread']:.0f} ms) "
            f"| {r['qps_per_replica']:,.1f} "
            f"| {r['replicas']} / {r['query_nodes']:,} | {r['embedding_serving_cores']:.0f} | {r['object_storage_tib']:,.1f} TiB "
            f"| {r['ingest_core_hours']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="10e6,100e6,1e9", help="catalog sizes, comma-separated")
    ap.add_argument("--qps", type=float, default=100.0, help="searches a second to plan for")
    ap.add_argument("--index-result", type=Path, default=Path("runs/vectors-index-1m/result.json"),
                    help="a `bench.vectors --index` result to read the HNSW search cost from (if present)")
    ap.add_argument("--index", choices=sorted(INDEX_UNITS), default="hnsw",
                    help="the catalogs' vector index (its memory a row and search cost)")
    ap.add_argument("--photo-bytes", type=int, default=UNITS["photo_bytes"], help="bytes of a kept source photo")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    units = units_from(a.index_result, a.index)
    units["photo_bytes"] = a.photo_bytes
    rows = [plan(float(p), units, a.qps) for p in a.photos.split(",")]
    print(json.dumps({"units": units, "rows": rows}, indent=1) if a.json else table(rows))


if __name__ == "__main__":
    main()
