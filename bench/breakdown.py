"""Where a search's time goes: each RPC of a search called alone, then the whole Search, same photos.

    python -m bench.breakdown [--catalog-size 10000] [--queries 20] [--rounds 2] [--milvus-uri URI] [--out DIR]

A fresh local mesh and catalog as `bench.overhead` makes them (real photos through the queue,
synthetic vectors up to --catalog-size). Then, per query photo, one after the other from this
client: Detect; Embed of the full frame; Embed of the best box; Detect and the full frame's
Embed at once (as the gateway runs them under "both"); the vector search of two views x 200
rows (`VectorStore.search_many`, Bounded); reading the 100 candidates' vectors (what QE
re-ranking reads); Rerank "qe" over those candidates; and the gateway's Search. p50/mean/p90 per
step. The steps on the Search's critical path are: Detect || Embed(full), Embed(box), vector
search, Rerank; what the Search takes beyond their sum is the gateway's own work and its hops.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

STEPS = ("detect", "embed_full", "embed_box", "detect_with_embed_full", "vector_search", "read_100_vectors", "rerank_qe",
         "search")


def run(catalog_size: int, n_queries: int, rounds: int, out: Path | None, milvus_uri: str = "", n_real: int = 200,
        progress=print) -> dict:
    from bench.common import grocery_catalog_and_queries, mesh_up, write_result
    from bench.overhead import fill_catalog
    from visearch import mesh
    from visearch.client import Client
    from visearch.detection.v1 import detection_pb2, detection_pb2_grpc
    from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from visearch.grpcserver import sync_channel
    from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
    from visearch.settings import SecuritySettings, StoreSettings
    from visearch.store import BOUNDED, VectorStore

    real, val = grocery_catalog_and_queries(catalog_size, n_real, n_queries)
    queries = [p.path.read_bytes() for p in val]
    ms: dict[str, list[float]] = {k: [] for k in STEPS}

    def timed(step, fn):
        t = time.perf_counter()
        r = fn()
        ms[step].append((time.perf_counter() - t) * 1000)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "mesh"
        state = mesh_up(data, {"VISEARCH_MILVUS_URI": milvus_uri} if milvus_uri else {})
        channels = []
        try:
            key = mesh.read_admin_key(data)
            catalog = f"breakdown{int(time.time())}"
            items = fill_catalog(state, key, catalog, real, catalog_size, tmp, progress)
            time.sleep(StoreSettings.model_fields["bounded_window_seconds"].default + 1.5)  # a catalog at rest
            token = (data / "secrets" / "internal.token").read_text().strip()
            addr = {c["name"]: c["address"] for c in state["components"]}

            def stub(cls, name):
                ch = sync_channel(addr[name], SecuritySettings(), key=token)
                channels.append(ch)
                return cls(ch)

            det = stub(detection_pb2_grpc.DetectionServiceStub, "detection")
            emb = stub(embedding_pb2_grpc.EmbeddingServiceStub, "embedding")
            rr = stub(rerank_pb2_grpc.RerankServiceStub, "rerank")
            store = VectorStore(StoreSettings(milvus_uri=next(c["address"] for c in state["components"]
                                                              if c["kind"] == "milvus")))
            gen = store.live(catalog)
            with Client(state["gateway"], api_key=key, timeout=60) as vs:
                for q in queries[:3]:  # warm-up: sessions, caches, the index loaded
                    vs.search(q, catalog=catalog)
                for _ in range(rounds):
                    for q in queries:
                        def detect(q=q):
                            return det.Detect(detection_pb2.DetectRequest(images=[q], max_detections=5), timeout=30)

                        def embed(item):
                            return emb.Embed(embedding_pb2.EmbedRequest(items=[item], model_version=gen.model_version),
                                             timeout=30)

                        found = timed("detect", detect).results[0].detections
                        full = timed("embed_full", lambda q=q: embed(embedding_pb2.EmbedItem(image=q)))
                        boxed = embedding_pb2.EmbedItem(image=q)
                        if found:
                            boxed.box.CopyFrom(found[0].box)
                        timed("embed_box", lambda boxed=boxed: embed(boxed))

                        def both(q=q):
                            th = threading.Thread(target=embed, args=(embedding_pb2.EmbedItem(image=q),))
                            th.start()
                            detect()
                            th.join()

                        timed("detect_with_embed_full", both)
                        v = list(full.embeddings[0].values)
                        rows = timed("vector_search", lambda v=v: store.search_many(gen, [v, v], 200, {}, level=BOUNDED))
                        cands = list({o.object_id: o for o in rows[0]}.values())[:100]
                        timed("read_100_vectors", lambda c=cands: store.get_vectors(gen, [o.object_id for o in c],
                                                                                    BOUNDED))
                        req = rerank_pb2.RerankRequest(
                            catalog=catalog, query_embedding=v, method="qe", top_k=10, generation=gen.number,
                            consistency=BOUNDED,
                            candidates=[rerank_pb2.Candidate(item_id=o.item_id, object_id=o.object_id, score=o.score)
                                        for o in cands])
                        timed("rerank_qe", lambda req=req: rr.Rerank(req, timeout=30))
                        timed("search", lambda q=q: vs.search(q, catalog=catalog))
            store.close()
        finally:
            for ch in channels:
                ch.close()
            mesh.down(data, log=lambda m: None)
    steps = {k: {"p50_ms": round(float(np.percentile(v, 50)), 1), "mean_ms": round(float(np.mean(v)), 1),
                 "p90_ms": round(float(np.percentile(v, 90)), 1)} for k, v in ms.items()}
    path = ("detect_with_embed_full", "embed_box", "vector_search", "rerank_qe")
    critical = round(sum(steps[k]["p50_ms"] for k in path), 1)
    result = {"store": "Milvus server " + milvus_uri if milvus_uri else "Milvus Lite", "catalog_items": items,
              "model": gen.model_tag, "dim": gen.dim, "queries": len(queries), "rounds": rounds, "steps": steps,
              "critical_path_p50_ms": critical,
              "search_beyond_critical_path_p50_ms": round(steps["search"]["p50_ms"] - critical, 1)}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['store']}, catalog of {r['catalog_items']} items ({r['model']}, {r['dim']}-d); "
             f"{r['queries']} photos x {r['rounds']} rounds, each step called alone from one client.", "",
             "| step | p50 ms | mean ms | p90 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['p50_ms']} | {v['mean_ms']} | {v['p90_ms']} |" for k, v in r["steps"].items()]
    lines += ["", f"Critical path (detect_with_embed_full + embed_box + vector_search + rerank_qe), p50: "
              f"{r['critical_path_p50_ms']} ms; the Search beyond it: {r['search_beyond_critical_path_p50_ms']} ms.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.common import mesh_bench_args

    args = mesh_bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 20, 200).parse_args(argv)
    print(markdown(run(args.catalog_size, args.queries, args.rounds, args.out, args.milvus_uri, args.real)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
