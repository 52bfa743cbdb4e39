"""Searches during a blue/green re-embedding: `python -m bench.reembed [--items 300] [--out runs/reembed]`.

Brings a fresh local mesh up on a model repository holding the served embedder as version 1,
ingests grocery photos into a catalog, deploys version 2 (the same network followed by a
random rotation: its vectors are unrelated to version 1's, so any cross-version comparison
would show), then re-embeds the catalog with `ReembedCatalog` while one client searches
without pause with catalog photos. Reports, before / during / after the re-embedding:
searches, errors, p50/p99 latency, the model versions that answered, and how often the
query photo came back first at cosine > 0.9 (it does whenever query and catalog share a
model). Writes result.json, a markdown table and a timeline picture to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rotated_embedder(src: Path, dst: Path, version: int, seed: int = 0) -> np.ndarray:
    """Write `src`'s embedder followed by a random rotation as a new version folder; returns the
    rotation. Its vectors are as good among themselves and unrelated to src's (cosine ~ 0)."""
    import onnx
    from onnx import helper, numpy_helper

    from visearch.models import ModelRecord

    model = onnx.load(src / "model.onnx")
    meta = ModelRecord.read(src)
    out = meta.output_name
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((meta.dim, meta.dim)))
    for node in model.graph.node:
        node.output[:] = [f"{out}_unrotated" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(q.astype(np.float32), "visearch_rotation"))
    model.graph.node.append(helper.make_node("MatMul", [f"{out}_unrotated", "visearch_rotation"], [out]))
    dst.mkdir(parents=True)
    onnx.save(model, dst / "model.onnx")
    meta.derive(version=version, model_sha256="").write(dst)
    return q


def versioned_repo(model_repo: Path, dst: Path) -> Path:
    """A model repository whose embedder version 1 is the served one (linked, not copied)."""
    for name in ("embedder", "detector"):
        (dst / name).mkdir(parents=True)
        shutil.copy(model_repo / name / "config.pbtxt", dst / name / "config.pbtxt")
        latest = max((p for p in (model_repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        (dst / name / "1").symlink_to(latest.resolve())
    return dst


def percentile(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 1) if xs else 0.0


def run(items: int, out: Path, retire_after: float, settle: float = 10.0, progress=print) -> dict:
    from bench.common import mesh_up
    from visearch import mesh
    from visearch.client import GatewayClient
    from visearch.datasets import grocery_root, grocery_split
    from visearch.demo import item_id, write_manifest
    from visearch.sdk import ingest_rows, read_manifest, wait_job
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    root = grocery_root()
    photos = [p for p in grocery_split(root, "train") if p.is_product]
    photos = photos[:: max(1, len(photos) // items)][:items]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = versioned_repo(Path(DEFAULT_MODEL_REPOSITORY), tmp / "repo")
        # The mesh's processes take their settings from this environment: set for the start only.
        data = tmp / "mesh"
        state = mesh_up(data, {"VISEARCH_MODEL_REPOSITORY": str(repo), "VISEARCH_RETIRE_AFTER_SECONDS": str(retire_after)})
        try:
            key = mesh.read_admin_key(data)
            client = GatewayClient(state["gateway"], key=key, timeout=60)
            rows = read_manifest(write_manifest(photos, tmp / "catalog.csv"))
            t0 = time.monotonic()
            job_id, _ = ingest_rows(client, rows, "bench", by_path=False)
            job = wait_job(client, job_id, len(rows), quiet=True)
            ingest_s = time.monotonic() - t0
            progress(f"ingested {job.done} items in {ingest_s:.1f} s ({job.failed} failed)")
            rotated_embedder(repo / "embedder" / "1", repo / "embedder" / "2", 2)
            mesh.restart(data, "embedding")

            queries = [(item_id(p), p.path.read_bytes()) for p in photos[: min(40, len(photos))]]
            samples: list[dict] = []
            stop = threading.Event()

            def search_loop():
                with GatewayClient(state["gateway"], key=key, timeout=30) as c:
                    n = 0
                    while not stop.is_set():
                        want, image = queries[n % len(queries)]
                        n += 1
                        t, began = time.perf_counter(), time.monotonic()  # a search belongs to the phase it began in
                        try:
                            r = c.search(image, catalog="bench", top_k=10)
                            samples.append({"t": began, "ms": (time.perf_counter() - t) * 1000,
                                            "version": r.model.version, "self": bool(r.hits) and r.hits[0].item_id
                                            == want and r.hits[0].score > 0.9})
                        except Exception as exc:  # noqa: BLE001 - counted, reported
                            samples.append({"t": began, "ms": (time.perf_counter() - t) * 1000,
                                            "version": "", "self": False, "error": f"{type(exc).__name__}"})

            thread = threading.Thread(target=search_loop, daemon=True)
            thread.start()
            time.sleep(settle)
            start = time.monotonic()
            res = client.reembed("bench")
            progress(f"re-embedding job {res.job_id} into generation {res.generation}")
            job = client.wait(res.job_id, poll=0.25)
            switched = time.monotonic()
            progress(f"{job.phase} after {switched - start:.1f} s: {job.message}")
            time.sleep(settle)
            stop.set()
            thread.join(60)
            client.close()
        finally:
            mesh.down(data, log=lambda m: None)

    phases = {"before": [s for s in samples if s["t"] < start],
              "during": [s for s in samples if start <= s["t"] < switched],
              "after": [s for s in samples if s["t"] >= switched]}
    table = {}
    for name, ss in phases.items():
        ok = [s for s in ss if "error" not in s]
        table[name] = {"searches": len(ss), "errors": len(ss) - len(ok), "p50_ms": percentile([s["ms"] for s in ok], 50),
                       "p99_ms": percentile([s["ms"] for s in ok], 99),
                       "versions": sorted({s["version"] for s in ok}),
                       "self_first": round(sum(s["self"] for s in ok) / max(1, len(ok)), 3)}
    result = {"items": job.submitted, "ingest_s": round(ingest_s, 1), "ingest_items_per_s": round(len(rows) / ingest_s, 1),
              "reembed_s": round(switched - start, 1), "reembed_items_per_s": round(job.done / (switched - start), 1),
              "phase": job.phase, "failed": job.failed, "phases": table,
              "versions_in_order": [v for v in _runs([s["version"] for s in samples if "error" not in s])]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(markdown(result))
    plot(samples, start, switched, out / "reembed-timeline.png")
    return result


def _runs(xs: list[str]) -> list[str]:
    """Consecutive runs collapsed: [1, 1, 2, 2] -> [1, 2]."""
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def markdown(r: dict) -> str:
    lines = [f"{r['items']} items; ingest {r['ingest_items_per_s']} items/s; re-embedding {r['reembed_s']} s "
             f"({r['reembed_items_per_s']} items/s), {r['phase']}, {r['failed']} failed; model versions answering "
             f"in order: {' -> '.join(r['versions_in_order'])}", "",
             "| phase | searches | errors | p50 ms | p99 ms | model versions | query photo first (cos > 0.9) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name, p in r["phases"].items():
        lines.append(f"| {name} | {p['searches']} | {p['errors']} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{', '.join(p['versions'])} | {p['self_first']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(samples: list[dict], start: float, switched: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = samples[0]["t"] if samples else 0
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for version, color in (("1", "tab:blue"), ("2", "tab:green")):
        ss = [s for s in samples if s["version"] == version and "error" not in s]
        ax.scatter([s["t"] - t0 for s in ss], [s["ms"] for s in ss], s=6, color=color, label=f"answered by embedder:{version}")
    errs = [s for s in samples if "error" in s]
    if errs:
        ax.scatter([s["t"] - t0 for s in errs], [s["ms"] for s in errs], s=14, color="red", marker="x", label="error")
    ax.axvspan(start - t0, switched - t0, color="orange", alpha=0.15, label="re-embedding (new generation built)")
    ax.axvline(switched - t0, color="black", lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("search latency, ms")
    ax.set_title("Searches while a catalog is re-embedded blue/green (one client, no pause)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--retire-after", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=10.0, help="Seconds of searches before and after.")
    ap.add_argument("--out", type=Path, default=Path("runs/reembed"))
    args = ap.parse_args(argv)
    result = run(args.items, args.out, args.retire_after, args.settle)
    print(markdown(result))
    return 0 if result["phase"] == "switched" and not any(p["errors"] for p in result["phases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
