"""Search latency against the raw cost of its model forwards: `python -m bench.overhead [--catalog-size 10000]`.

Side by side in one run, on the same grocery val photos:
  raw      ONNX Runtime in this process, one intra-op thread, the served detector and embedder
           on inputs prepared beforehand: the forwards a default search needs (the detector on the
           photo, the embedder on a batch of 2: the best box and the full frame), timed on each
           photo just before its search, so both see the same load of the machine;
  verify   the raw cost of geometric verification on inputs prepared beforehand: the query's
           local features extracted (visearch.local, as the embedding service does) and matched
           against the stored features of its top 20 candidates, with one BLAS thread as the
           services run (before stop 41 this process's BLAS pool kept spinning on both cores
           after the matching, and the search timed next, always the default, paid for it);
  search   gateway Search through a fresh local mesh (defaults: query objects "both", re-rank
           "verify") over a catalog of --catalog-size items (a few hundred real photos through the
           queue, the rest synthetic unit vectors of the real dimension written to the store), one
           client, one query at a time, after a warm-up; each photo also searched with each of
           --compare (e.g. "qe", the previous default), interleaved, so the methods share the load,
           and taking turns at going first after the raw timings;
  where    each service's own time per search, from their /metrics (visearch_rpc_seconds sums):
           detection, embedding, re-rank, and the gateway's remainder (decode, vector search,
           gRPC hops, Python).
  accuracy the same searches' answers, scored against the real photos' products: recall@1 (the
           first hit shows the query's product) and mAP@10 (average precision of the top 10, over
           min(10, that product's items in the catalog)), so a speed-up is read beside its effect.
Prints a markdown table; --out writes result.json and result.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def pct(xs, q: float) -> float:
    return round(float(np.percentile(xs, q)), 1)


class RawForwards:
    """The forwards a default search runs, in this process on inputs prepared beforehand: the
    detector on the photo, the embedder on a batch of 2 (a crop and the full frame)."""

    def __init__(self, repo: Path, photos: list[Path]):
        from bench.common import ort_session
        from visearch import imaging
        from visearch.detector import prepare as detect_prepare
        from visearch.embedding_model import prepare as embed_prepare

        self.det, self.det_meta = ort_session(repo, "detector")
        self.emb, self.emb_meta = ort_session(repo, "embedder")
        self.inputs = {}
        for path in photos:
            data = path.read_bytes()
            img = imaging.decode_image(data)
            w, h = img.size
            box = (w * 0.25, h * 0.25, w * 0.75, h * 0.75)  # a crop and the full frame, as "both" embeds
            size = self.emb_meta.input_size
            self.inputs[path] = (detect_prepare(img, self.det_meta.input_size)[0][None],
                                 np.stack([embed_prepare(data, box, size)[0], embed_prepare(data, None, size)[0]]))
            self.time(path)  # warm-up

    def time(self, path: Path) -> tuple[float, float]:
        """(detector ms, embedder ms) of one run on this photo's inputs."""
        x_det, x_emb = self.inputs[path]
        t = time.perf_counter()
        self.det.run(["boxes", "scores"], {self.det_meta.input_name: x_det})
        d = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        self.emb.run([self.emb_meta.output_name], {self.emb_meta.input_name: x_emb})
        return d, (time.perf_counter() - t) * 1000

    def verify_time(self, path: Path, candidates: list) -> tuple[float, float]:
        """(extract ms, match ms): the query's local features, then verified against `candidates`,
        with one BLAS thread as the re-rank service runs it (visearch.mesh). A BLAS pool of more
        threads would also keep spinning after the matching, on the cores the next search needs."""
        from threadpoolctl import threadpool_limits

        from visearch import local
        from visearch.imaging import decode_image

        img = np.asarray(decode_image(path.read_bytes()))
        with threadpool_limits(1):
            t = time.perf_counter()
            q = local.RootSift(max_side=local.QUERY_SIDE)(img)  # as the gateway asks for a query's
            e = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            local.verify_top(q, dict(enumerate(candidates)), len(candidates))
            return e, (time.perf_counter() - t) * 1000

    def summary(self, det_ms: list[float], emb_ms: list[float]) -> dict:
        total = [a + b for a, b in zip(det_ms, emb_ms, strict=True)]
        return {"detector_ms": round(float(np.median(det_ms)), 1), "embedder_batch2_ms": round(float(np.median(emb_ms)), 1),
                "sum_p50_ms": pct(total, 50), "sum_p99_ms": pct(total, 99), "detector_version": self.det_meta.version,
                "embedder": self.emb_meta.tag, "embedder_input": self.emb_meta.input_size,
                "detector_input": self.det_meta.input_size}


def accuracy(answers: list[list[str]], truth: list[int], product_of: dict[str, int]) -> dict:
    """recall@1 and mAP@10 of each search's top 10 (item ids) against the query's product."""
    r1, aps = [], []
    count = {}
    for fid in product_of.values():
        count[fid] = count.get(fid, 0) + 1
    for ids, fid in zip(answers, truth, strict=True):
        rel = [product_of.get(i) == fid for i in ids[:10]]
        r1.append(float(bool(rel) and rel[0]))
        hits, ap = 0, 0.0
        for rank, ok in enumerate(rel, 1):
            if ok:
                hits += 1
                ap += hits / rank
        aps.append(ap / max(1, min(10, count.get(fid, 0))))
    return {"recall@1": round(float(np.mean(r1)), 4), "mAP@10": round(float(np.mean(aps)), 4)}


def fill_catalog(state: dict, key: str, catalog: str, real: list, size: int, tmp: Path, progress) -> int:
    """Real photos through the queue, then synthetic unit vectors up to `size` items."""
    from bench.common import wait_indexed
    from visearch.client import Client
    from visearch.demo import write_manifest
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore, WriteClock

    with Client(state["gateway"], api_key=key, timeout=120) as vs:
        from visearch.sdk import ingest_rows, read_manifest

        job_id, _ = ingest_rows(vs, read_manifest(write_manifest(real, tmp / "real.csv")), catalog, by_path=False)
        job = vs.wait(job_id)
        progress(f"{job.done} real photos ingested ({job.failed} failed)")
    import redis

    milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
    redis_url = next(c["address"] for c in state["components"] if c["kind"] == "redis")
    store = VectorStore(StoreSettings(milvus_uri=milvus), WriteClock(redis.Redis.from_url(redis_url)))  # marks as a writer
    gen = store.live(catalog)
    rng = np.random.default_rng(0)
    n_synth = max(0, size - len(real))
    for start in range(0, n_synth, 1000):
        n = min(1000, n_synth - start)
        v = rng.standard_normal((n, gen.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store.upsert_items(gen, [(f"synthetic{start + i}", [(v[i], (0, 0, 1, 1))], {"synthetic": "1"})
                                 for i in range(n)])
        progress(f"synthetic items: {start + n}/{n_synth}")
    store.flush(gen)
    total = len(store.item_stamps(gen))
    wait_indexed(store, gen, store.count(gen), progress, every=5)
    store.close()
    return total


def service_seconds(state: dict) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each service's main RPCs, from its /metrics."""
    import urllib.request

    want = {"detection": ("Detect",), "embedding": ("Embed", "ExtractLocal"), "rerank": ("Rerank",),
            "gateway": ("Search",)}
    out = {}
    for c in state["components"]:
        name = c["name"].split("-")[0]
        if name not in want or not c.get("metrics"):
            continue
        text = urllib.request.urlopen(f"http://{c['metrics']}/metrics", timeout=5).read().decode()
        s = n = 0.0
        for line in text.splitlines():
            if (line.startswith("visearch_rpc_seconds_") and 'code="OK"' in line
                    and any(f'method="{m}"' in line for m in want[name])):
                head, _, value = line.rpartition(" ")
                if head.startswith("visearch_rpc_seconds_sum"):
                    s += float(value)
                elif head.startswith("visearch_rpc_seconds_count"):
                    n += float(value)
        prev = out.get(name, (0.0, 0.0))
        out[name] = (prev[0] + s, prev[1] + n)
    return out


def run(catalog_size: int, n_queries: int, rounds: int, out: Path | None, n_real: int = 400, progress=print,
        milvus_uri: str = "", compare: tuple[str, ...] = ("qe",)) -> dict:
    from bench.common import grocery_catalog_and_queries, mesh_up, write_result
    from visearch import mesh
    from visearch.client import Client
    from visearch.demo import item_id
    from visearch.settings import DEFAULT_MODEL_REPOSITORY, StoreSettings

    real, val = grocery_catalog_and_queries(catalog_size, n_real, n_queries)  # spread over the products
    queries = [p.path for p in val]
    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    raw = RawForwards(repo, queries)
    from bench.common import stored_local_features

    stored = [stored_local_features(p.path) for p in real[:20]]  # stand-ins for a query's top 20 candidates

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "mesh"
        # A Milvus server instead of the mesh's own Milvus Lite when given.
        state = mesh_up(data, {"VISEARCH_MILVUS_URI": milvus_uri} if milvus_uri else {})
        try:
            key = mesh.read_admin_key(data)
            catalog = f"bench{int(time.time())}"  # a server may keep catalogs of earlier runs
            items = fill_catalog(state, key, catalog, real, catalog_size, tmp, progress)
            # Past the write window: searches read as they would on a catalog at rest.
            time.sleep(StoreSettings.model_fields["bounded_window_seconds"].default + 1.5)
            with Client(state["gateway"], api_key=key, timeout=60) as vs:
                for q in queries[:3]:  # warm-up: sessions, caches, the index loaded
                    vs.search(q, catalog=catalog)
                before = service_seconds(state)
                lat, answers, det_ms, emb_ms, ver_ms = [], [], [], [], []
                other: dict[str, list[float]] = {m: [] for m in compare}
                others_answers: dict[str, list] = {m: [] for m in compare}
                for r in range(rounds):
                    for i, q in enumerate(queries):
                        # The raw forwards and the search, one after the other on each photo: the
                        # same moment of this machine's load for both.
                        d, e = raw.time(q)
                        det_ms.append(d)
                        emb_ms.append(e)
                        ver_ms.append(raw.verify_time(q, stored))
                        image = q.read_bytes()
                        # The methods take turns at going first: the first search after the raw
                        # timings above runs on caches they left cold, and pays for it.
                        order = [None, *compare]
                        if (r * len(queries) + i) % 2:
                            order = order[1:] + order[:1]
                        for m in order:
                            t = time.perf_counter()
                            found = vs.search(image, catalog=catalog, rerank=m or "")
                            took = (time.perf_counter() - t) * 1000
                            (lat if m is None else other[m]).append(took)
                            if r == 0:
                                (answers if m is None else others_answers[m]).append([h.item_id for h in found.hits])
                after = service_seconds(state)
        finally:
            mesh.down(data, log=lambda m: None)
    n = len(lat)
    raw = raw.summary(det_ms, emb_ms)
    raw["verify_extract_ms"] = round(float(np.median([v[0] for v in ver_ms])), 1)
    raw["verify_match_top20_ms"] = round(float(np.median([v[1] for v in ver_ms])), 1)
    # Per search (a service may be called more than once per search: the embedder twice for "both").
    searches = max(1, after["gateway"][1] - before.get("gateway", (0, 0))[1])
    where = {k: round(1000 * (after[k][0] - before.get(k, (0, 0))[0]) / searches, 1) for k in after}
    where["gateway_own"] = round(where.get("gateway", 0) - where.get("detection", 0) - where.get("embedding", 0)
                                 - where.get("rerank", 0), 1)
    result = {"store": "Milvus server " + milvus_uri if milvus_uri else "Milvus Lite",
              "catalog_items": items, "queries": len(queries), "searches": n, "raw": raw,
              "search_p50_ms": pct(lat, 50), "search_p99_ms": pct(lat, 99),
              "p50_over_raw": round(pct(lat, 50) / raw["sum_p50_ms"], 2), "p99_over_p50": round(pct(lat, 99) / pct(lat, 50), 2),
              "mean_ms_per_search_by_service": where,
              "accuracy": accuracy(answers, [p.fine_id for p in val], {item_id(p): p.fine_id for p in real}),
              "compare": {m: {"search_p50_ms": pct(other[m], 50), "search_p99_ms": pct(other[m], 99),
                              "accuracy": accuracy(others_answers[m], [p.fine_id for p in val],
                                                   {item_id(p): p.fine_id for p in real})} for m in compare}}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    raw, w = r["raw"], r["mean_ms_per_search_by_service"]
    return "\n".join([
        f"{r['store']}: catalog of {r['catalog_items']} items; "
        f"{r['searches']} searches of {r['queries']} grocery val photos, one at a time.",
        "",
        "| | p50 ms | p99 ms | ratio |",
        "|---|---:|---:|---:|",
        f"| raw forwards (detector {raw['detector_ms']} + embedder x2 {raw['embedder_batch2_ms']}) | {raw['sum_p50_ms']} | "
        f"{raw['sum_p99_ms']} | 1.00 |",
        f"| gateway Search | {r['search_p50_ms']} | {r['search_p99_ms']} | "
        f"p50 {r['p50_over_raw']}x raw; p99 {r['p99_over_p50']}x p50 |",
        "",
        "Mean ms per search inside each service (server side, from /metrics): "
        + ", ".join(f"{k} {v}" for k, v in w.items()),
        "",
        "Accuracy of the same searches (first round; the real photos' products): "
        + ", ".join(f"{k} {v}" for k, v in r["accuracy"].items()),
        "",
        f"Raw verification on prepared inputs: the query's local features {raw.get('verify_extract_ms')} ms (extracted "
        f"beside the box's forward), matching and verifying 20 candidates {raw.get('verify_match_top20_ms')} ms.",
        "",
        *[f"Searched with --rerank {m} in the same run: p50 {c['search_p50_ms']} ms, p99 {c['search_p99_ms']} ms, "
          f"default minus it {round(r['search_p50_ms'] - c['search_p50_ms'], 1)} ms at p50; accuracy "
          + ", ".join(f"{k} {v}" for k, v in c["accuracy"].items()) for m, c in r.get("compare", {}).items()],
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog-size", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--real", type=int, default=400, help="Real photos ingested through the queue (the rest synthetic).")
    ap.add_argument("--out", type=Path, default=Path("runs/overhead"))
    ap.add_argument("--milvus-uri", default="", help="A Milvus server to use instead of the mesh's Milvus Lite "
                    "(e.g. `.venv-milvus/bin/milvus-server --data DIR --proxy-port 19531`: http://127.0.0.1:19531).")
    ap.add_argument("--compare", default="qe", help="re-rank methods also timed per photo, comma-separated ('' none)")
    args = ap.parse_args(argv)
    result = run(args.catalog_size, args.queries, args.rounds, args.out, args.real, milvus_uri=args.milvus_uri,
                 compare=tuple(m for m in args.compare.split(",") if m))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
