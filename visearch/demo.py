"""`visearch demo`: the mesh's main job on real shop photos, end to end.

Brings the mesh up, ingests the Grocery Store train split (2,640 photos: 31
packaged products at instance level, fruit and vegetables as distractors) through
the queue, searches with the val photos of packaged products through the gateway,
and prints example results and retrieval metrics.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import click

from visearch import mesh
from visearch.client import GatewayClient
from visearch.datasets import Photo, grocery_root, grocery_split
from visearch.metrics import match_report, retrieval_report
from visearch.sdk import ingest_rows, read_manifest, search_one, wait_job


def trained_on_val(repo) -> bool:
    """Whether the served embedder's training saw the val photos (the `trainval` production split, or
    `trainval-iconic`)."""
    from visearch.inference import read_meta
    from visearch.models.record import ModelRecord
    from visearch.models.repository import version_dir
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    repo = Path(repo or DEFAULT_MODEL_REPOSITORY)
    try:
        meta = read_meta(repo, "embedder")
        record = ModelRecord.read(version_dir(repo, "embedder", meta.version))
        source = (record.reduction or {}).get("source_version")
        if source:
            record = ModelRecord.read(version_dir(repo, "embedder", source))
    except Exception:  # noqa: BLE001 - a note, never a failure of the demo
        return False
    training = record.training or {}
    return (training.get("train_split") or {}).get("split") in ("trainval", "trainval-iconic")


def item_id(photo: Photo) -> str:
    return photo.path.stem


def write_manifest(photos: list[Photo], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "path", "product", "group"])
        for p in photos:
            w.writerow([item_id(p), str(p.path), p.fine_name, p.coarse_name])
    return path


def evaluate(client, queries: list[Photo], database: list[Photo], catalog: str, top_k: int = 100,
             show: int = 5, echo=click.echo) -> dict:
    """Search with each query through the gateway; grocery protocol 1 metrics."""
    by_class: dict[int, set[str]] = {}
    for p in database:
        by_class.setdefault(p.fine_id, set()).add(item_id(p))
    names = {item_id(p): p.fine_name for p in database}
    rankings, hits, positives, latencies, errors = [], [], [], [], 0
    for n, q in enumerate(queries):
        out = search_one(client, str(q.path), catalog, top_k, "", {})
        if "error" in out:
            errors += 1
            echo(f"  {q.path.name}: {out['error']['code']}: {out['error']['message']}")
            rankings.append([])
            hits.append([])
        else:
            rankings.append([h["item_id"] for h in out["hits"]])
            hits.append(out["hits"])
            latencies.append(out["latency_ms"])
        positives.append(by_class.get(q.fine_id, set()))
        if n < show and "error" not in out:
            echo(f"\nquery {q.path.name}  ({q.fine_name})")
            for rank, h in enumerate(out["hits"][:5], 1):
                mark = "=" if h["item_id"] in positives[-1] else " "
                echo(f"  {rank}. {mark} {names.get(h['item_id'], '?'):<28} {h['item_id']:<34} {h['score']:.3f}")
    report = retrieval_report(rankings, positives)
    report.update(match_report(hits, positives))
    lat = sorted(latencies)
    if lat:
        report["latency_ms_p50"] = lat[len(lat) // 2]
        report["latency_ms_p99"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    report["errors"] = errors
    return report


def run_demo(data_dir: Path, catalog: str = "demo", n_queries: int = 0, keep_up: bool = False,
             timeout: float = 60.0) -> dict:
    root = grocery_root()
    if root is None:
        raise click.ClickException(
            "the demo catalog is the Grocery Store dataset, expected at ../shared/data/grocery-store "
            "(or set VISEARCH_GROCERY_DIR)")
    database = grocery_split(root, "train")
    queries = [p for p in grocery_split(root, "val") if p.is_product]
    if n_queries:
        queries = queries[:n_queries]
    click.echo(f"demo: {len(database)} catalog photos, {len(queries)} query photos from {root}", err=True)

    was_up = bool(mesh.status(data_dir)) and all(c["healthy"] for c in mesh.status(data_dir))
    state = mesh.up(data_dir, log=lambda m: click.echo(m, err=True))
    try:
        rows = read_manifest(write_manifest(database, Path(state["data_dir"]) / "demo" / "manifest.csv"))
        with GatewayClient(state["gateway"], key=mesh.read_admin_key(data_dir), timeout=timeout) as client:
            t0 = time.monotonic()
            job_id, local_failed = ingest_rows(client, rows, catalog, by_path=False)
            job = wait_job(client, job_id, len(rows))
            secs = time.monotonic() - t0
            click.echo(f"ingested {job.done} photos into catalog {catalog!r} in {secs:.0f}s "
                       f"({job.done / max(secs, 1e-6):.1f}/s), {job.failed + len(local_failed)} failed")
            cat = next((c for c in client.catalogs() if c.name == catalog), None)
            if cat is not None:
                click.echo(f"catalog {catalog!r}: {cat.objects} objects, {cat.memory_bytes_per_object} bytes each "
                           f"in the vector store's memory, {cat.bytes_per_object} stored in all (regions "
                           f"{cat.storage.regions or 'off'})")
            report = evaluate(client, queries, database, catalog)
        click.echo("\nphoto -> photo retrieval (queries: val photos of packaged products; "
                   "positives: train photos of the same product)")
        for k in ("n_queries", "recall@1", "recall@5", "recall@10", "mAP@20", "mAP", "matched_top1",
                  "match_precision", "latency_ms_p50", "latency_ms_p99", "errors"):
            if report.get(k) is not None:
                v = report[k]
                click.echo(f"  {k:<16} {v:.3f}" if isinstance(v, float) else f"  {k:<16} {v}")
        click.echo("  (mAP over each query's top 100 hits; matched_top1: the share of queries whose top hit is flagged\n"
                   "   match, match_precision: the share of those that are the right product)")
        if trained_on_val(os.environ.get("VISEARCH_MODEL_REPOSITORY")):
            click.echo("  note: the served embedder is the production model, trained on these val photos too: the\n"
                       "  figures above are not held-out ones. Its train-only twin's are in docs/TRAINING.md.")
        return report
    finally:
        if not (keep_up or was_up):
            mesh.down(data_dir, log=lambda m: click.echo(m, err=True))
