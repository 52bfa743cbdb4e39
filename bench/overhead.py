"""Search latency against the raw cost of its model forwards: `python -m bench.overhead [--catalog-size 10000]`.

Side by side in one run, on the same grocery val photos:
  raw      ONNX Runtime in this process, one intra-op thread, the served detector and embedder
           on inputs prepared beforehand: the forwards a default search needs (the detector on the
           photo, the embedder on a batch of 2: the best box and the full frame);
  search   gateway Search through a fresh local mesh (defaults: query objects "both", re-rank
           "qe") over a catalog of --catalog-size items (a few hundred real photos through the queue,
           the rest synthetic unit vectors of the real dimension written to the store), one client,
           one query at a time, after a warm-up;
  where    each service's own time per search, from their /metrics (visearch_rpc_seconds sums):
           detection, embedding, re-rank, and the gateway's remainder (decode, vector search,
           gRPC hops, Python).
Prints a markdown table; --out writes result.json and result.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def pct(xs, q: float) -> float:
    return round(float(np.percentile(xs, q)), 1)


def raw_forwards(repo: Path, photos: list[Path], repeats: int) -> dict:
    """Per photo, the median time of the forwards a default search runs, ms."""
    import onnxruntime as ort

    from services.embedding.server import prepare as embed_prepare
    from visearch import imaging
    from visearch.detector import prepare as detect_prepare
    from visearch.inference import read_meta, resolve_version

    def session(name: str):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = resolve_version(repo, name) / "model.onnx"
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), read_meta(repo, name)

    det, det_meta = session("detector")
    emb, emb_meta = session("embedder")
    det_ms, emb_ms = [], []
    for path in photos:
        data = path.read_bytes()
        img = imaging.decode_image(data)
        x_det = detect_prepare(img, det_meta.input_size)[0][None]
        w, h = img.size
        box = (w * 0.25, h * 0.25, w * 0.75, h * 0.75)  # a crop and the full frame, as "both" embeds
        x_emb = np.stack([embed_prepare(data, box, emb_meta.input_size)[0], embed_prepare(data, None, emb_meta.input_size)[0]])
        det.run(["boxes", "scores"], {det_meta.input_name: x_det})
        emb.run([emb_meta.output_name], {emb_meta.input_name: x_emb})
        d, e = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            det.run(["boxes", "scores"], {det_meta.input_name: x_det})
            d.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            emb.run([emb_meta.output_name], {emb_meta.input_name: x_emb})
            e.append((time.perf_counter() - t) * 1000)
        det_ms.append(float(np.median(d)))
        emb_ms.append(float(np.median(e)))
    total = [a + b for a, b in zip(det_ms, emb_ms, strict=True)]
    return {"detector_ms": round(float(np.median(det_ms)), 1), "embedder_batch2_ms": round(float(np.median(emb_ms)), 1),
            "sum_p50_ms": pct(total, 50), "sum_p99_ms": pct(total, 99), "detector_version": det_meta.version,
            "embedder": emb_meta.tag, "embedder_input": emb_meta.input_size, "detector_input": det_meta.input_size}


def fill_catalog(state: dict, key: str, catalog: str, real: list, size: int, tmp: Path, progress) -> int:
    """Real photos through the queue, then synthetic unit vectors up to `size` items."""
    from visearch.client import Client
    from visearch.demo import write_manifest
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    with Client(state["gateway"], api_key=key, timeout=120) as vs:
        from visearch.cli import ingest_rows, read_manifest

        job_id, _ = ingest_rows(vs, read_manifest(write_manifest(real, tmp / "real.csv")), catalog, by_path=False)
        job = vs.wait(job_id)
        progress(f"{job.done} real photos ingested ({job.failed} failed)")
    milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
    store = VectorStore(StoreSettings(milvus_uri=milvus))
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
    store.close()
    return total


def service_seconds(state: dict) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each service's main RPC, from its /metrics."""
    import urllib.request

    want = {"detection": "Detect", "embedding": "Embed", "rerank": "Rerank", "gateway": "Search"}
    out = {}
    for c in state["components"]:
        name = c["name"].split("-")[0]
        if name not in want or not c.get("metrics"):
            continue
        text = urllib.request.urlopen(f"http://{c['metrics']}/metrics", timeout=5).read().decode()
        s = n = 0.0
        for line in text.splitlines():
            if line.startswith("visearch_rpc_seconds_") and f'method="{want[name]}"' in line and 'code="OK"' in line:
                head, _, value = line.rpartition(" ")
                if head.startswith("visearch_rpc_seconds_sum"):
                    s += float(value)
                elif head.startswith("visearch_rpc_seconds_count"):
                    n += float(value)
        prev = out.get(name, (0.0, 0.0))
        out[name] = (prev[0] + s, prev[1] + n)
    return out


def run(catalog_size: int, n_queries: int, rounds: int, out: Path | None, n_real: int = 400, progress=print) -> dict:
    from visearch import mesh
    from visearch.client import Client
    from visearch.datasets import grocery_root, grocery_split
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    root = grocery_root()
    train = [p for p in grocery_split(root, "train") if p.is_product]
    n_real = min(n_real, catalog_size)
    real = train[:: max(1, len(train) // n_real)][:n_real]
    queries = [p.path for p in grocery_split(root, "val") if p.is_product][:n_queries]
    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    raw = raw_forwards(repo, queries, repeats=5)
    progress(f"raw forwards: detector {raw['detector_ms']} ms + embedder x2 {raw['embedder_batch2_ms']} ms")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "mesh"
        state = mesh.up(data, log=lambda m: None)
        try:
            key = mesh.read_admin_key(data)
            items = fill_catalog(state, key, "bench", real, catalog_size, tmp, progress)
            with Client(state["gateway"], api_key=key, timeout=60) as vs:
                for q in queries[:3]:  # warm-up: sessions, caches, the index loaded
                    vs.search(q, catalog="bench")
                before = service_seconds(state)
                lat = []
                for _ in range(rounds):
                    for q in queries:
                        image = q.read_bytes()
                        t = time.perf_counter()
                        vs.search(image, catalog="bench")
                        lat.append((time.perf_counter() - t) * 1000)
                after = service_seconds(state)
        finally:
            mesh.down(data, log=lambda m: None)
    n = len(lat)
    where = {k: round(1000 * (after[k][0] - before.get(k, (0, 0))[0]) / max(1, after[k][1] - before.get(k, (0, 0))[1]), 1)
             for k in after}
    where["gateway_own"] = round(where.get("gateway", 0) - where.get("detection", 0) - where.get("embedding", 0)
                                 - where.get("rerank", 0), 1)
    result = {"catalog_items": items, "queries": len(queries), "searches": n, "raw": raw,
              "search_p50_ms": pct(lat, 50), "search_p99_ms": pct(lat, 99),
              "p50_over_raw": round(pct(lat, 50) / raw["sum_p50_ms"], 2), "p99_over_p50": round(pct(lat, 99) / pct(lat, 50), 2),
              "mean_ms_per_search_by_service": where}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "result.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    raw, w = r["raw"], r["mean_ms_per_search_by_service"]
    return "\n".join([
        f"Catalog of {r['catalog_items']} items; {r['searches']} searches of {r['queries']} grocery val photos, one at a time.",
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
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog-size", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--real", type=int, default=400, help="Real photos ingested through the queue (the rest synthetic).")
    ap.add_argument("--out", type=Path, default=Path("runs/overhead"))
    args = ap.parse_args(argv)
    result = run(args.catalog_size, args.queries, args.rounds, args.out, args.real)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
