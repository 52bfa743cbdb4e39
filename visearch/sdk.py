"""The SDK's bulk helpers on top of `visearch.client.Client`: CSV manifests, ingestion in requests of
bounded size under one job, waiting with a progress line, and search answers as JSON-ready dicts.

The CLI (`visearch ingest`, `visearch search`), the demo and the benchmarks call these; they need
only the client's dependencies (grpcio, protobuf), nothing of the server side.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import grpc

from visearch import files
from visearch.search import MAX_BATCH_SEARCHES

MAX_REQUEST_BYTES = 8 * 1024 * 1024
# The first request of an ingest is kept small so the workers start while the rest is sent.
FIRST_REQUEST_BYTES = 1024 * 1024


class ManifestError(ValueError):
    """A manifest whose header lacks item_id,path."""


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a terminal, except at the end)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.t0 = max(total, 1), label, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = -1.0

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def update(self, done: int, failed: int = 0, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self.last < (0.2 if self.tty else 10.0)):
            return
        self.last = now
        frac = min(1.0, (done + failed) / self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        rate = (done + failed) / max(now - self.t0, 1e-6)
        line = f"{self.label} [{bar}] {done + failed}/{self.total} ({failed} failed) {rate:.1f}/s"
        self._write(("\r" + line) if self.tty else line + "\n")

    def close(self) -> None:
        if self.tty:
            self._write("\n")


def read_manifest(path: Path) -> list[dict]:
    """Rows of a CSV with header item_id,path (other columns become metadata); paths relative to the CSV.
    ManifestError when the header lacks item_id,path."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"item_id", "path"} <= set(reader.fieldnames):
            raise ManifestError(f"{path}: the header must contain item_id,path (got {reader.fieldnames})")
        rows = []
        for row in reader:
            p = Path(row["path"])
            rows.append({"item_id": row["item_id"], "path": p if p.is_absolute() else (path.parent / p),
                         "metadata": {k: v for k, v in row.items() if k not in ("item_id", "path") and v}})
    return rows


def ingest_rows(client, rows: list[dict], catalog: str, by_path: bool, regions: str = "", duplicates: str = "",
                index: str = "") -> tuple[str, dict[str, str]]:
    """Send rows in requests of bounded size under one job id; returns (job id, local failures).
    `regions`, `index`: how a catalog the first request makes stores base regions, and its vector
    index ("": the defaults)."""
    from visearch.gateway.v1 import gateway_pb2

    job_id, local_failed = "", {}
    batch, size = [], 0

    def flush():
        nonlocal job_id, batch, size
        if batch:
            job_id = client.ingest(batch, catalog=catalog, job_id=job_id, regions=regions, duplicates=duplicates,
                                   index=index).job_id
        batch, size = [], 0

    for row in rows:
        if by_path:
            item = gateway_pb2.IngestItem(item_id=row["item_id"], uri=str(Path(row["path"]).resolve()),
                                          metadata=row["metadata"])
        else:
            try:
                data = files.read_file(row["path"])
            except files.ReadError as exc:
                local_failed[row["item_id"]] = str(exc)
                continue
            item = gateway_pb2.IngestItem(item_id=row["item_id"], image=data, metadata=row["metadata"])
        n = item.ByteSize()
        if batch and size + n > (MAX_REQUEST_BYTES if job_id else FIRST_REQUEST_BYTES):
            flush()
        batch.append(item)
        size += n
    flush()
    return job_id, local_failed


def wait_job(client, job_id: str, total: int, quiet: bool = False):
    """The job once nothing of it is pending, with a progress line on stderr unless `quiet`."""
    bar = None if quiet else Progress(total, "ingest")
    job = client.wait(job_id, on_progress=bar and (lambda j: bar.update(j.done, j.failed, force=j.pending == 0)))
    if bar:
        bar.close()
    return job


def rpc_error(exc: grpc.RpcError) -> dict:
    return {"code": exc.code().name, "message": exc.details() or ""}


def hits_json(resp_hits) -> list[dict]:
    hits = []
    for h in resp_hits:
        # match: the system is confident the hit shows the same object (the "verify" re-rank decides it).
        hit = {"item_id": h.item_id, "score": round(h.score, 6), "match": bool(h.match)}
        if h.HasField("box"):  # the matched object in the catalog image, pixels
            hit["box"] = [round(v, 1) for v in (h.box.x1, h.box.y1, h.box.x2, h.box.y2)]
        if h.metadata:
            hit["metadata"] = dict(h.metadata)
        if h.HasField("region"):  # where re-ranking matched, pixels of the catalog image
            hit["region"] = [round(v, 1) for v in (h.region.x1, h.region.y1, h.region.x2, h.region.y2)]
        if h.inliers:  # local features verified under one geometric transform
            hit["inliers"] = h.inliers
        hits.append(hit)
    return hits


def _answer(path: str, resp, latency_ms: float, read_ms: float) -> dict:
    qb = resp.query_box
    return {"query": path, "hits": hits_json(resp.hits), "latency_ms": round(latency_ms, 2),
            "read_ms": round(read_ms, 2), "query_box": [qb.x1, qb.y1, qb.x2, qb.y2],
            "model": f"{resp.model.name}:{resp.model.version}", "rerank": resp.rerank}


def search_batch(client, paths: list[str], catalog: str, top_k: int, rerank: str, filters: dict,
                 full_frame: bool = False, batch: int = MAX_BATCH_SEARCHES) -> list[dict]:
    """Each photo's answer, as search_one gives it, from BatchSearch calls of up to `batch` photos
    (their latency_ms is their call's)."""
    outs: list[dict | None] = [None] * len(paths)
    read: list[tuple[int, bytes, float]] = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            read.append((i, files.read_file(path), (time.perf_counter() - t0) * 1000))
        except files.ReadError as exc:
            outs[i] = {"query": path, "error": {"code": "INVALID_ARGUMENT", "message": str(exc)}}
    for start in range(0, len(read), batch):
        part = read[start:start + batch]
        t1 = time.perf_counter()
        try:
            results = client.search_many([d for _, d, _ in part], catalog=catalog, top_k=top_k, rerank=rerank,
                                         filters=filters, full_frame=full_frame)
        except grpc.RpcError as exc:
            for i, _, _ in part:
                outs[i] = {"query": paths[i], "error": rpc_error(exc)}
            continue
        latency = (time.perf_counter() - t1) * 1000
        for (i, _, read_ms), res in zip(part, results, strict=True):
            if res.HasField("error"):
                outs[i] = {"query": paths[i], "error": {"code": res.error.code, "message": res.error.message}}
            else:
                outs[i] = _answer(paths[i], res.response, latency, read_ms)
    return outs


def search_one(client, path: str, catalog: str, top_k: int, rerank: str, filters: dict, full_frame: bool = False,
               per_object: bool = False) -> dict:
    """One photo's answer as a dict (hits, latency_ms, query_box, model, ...), or {"query", "error"}."""
    t0 = time.perf_counter()
    try:
        data = files.read_file(path)
    except files.ReadError as exc:
        return {"query": path, "error": {"code": "INVALID_ARGUMENT", "message": str(exc)}}
    t1 = time.perf_counter()  # the search's latency is the call's: reading the photo here is the client's disk
    try:
        resp = client.search(data, catalog=catalog, top_k=top_k, rerank=rerank, filters=filters, full_frame=full_frame,
                             per_object=per_object)
    except grpc.RpcError as exc:
        return {"query": path, "error": rpc_error(exc)}
    latency = (time.perf_counter() - t1) * 1000
    out = _answer(path, resp, latency, (t1 - t0) * 1000)
    if per_object:
        out["objects"] = [{"query_box": [round(v, 1) for v in (o.query_box.x1, o.query_box.y1, o.query_box.x2,
                                                                o.query_box.y2)],
                           "score": round(o.detection_score, 4), "label": o.label, "hits": hits_json(o.hits)}
                          for o in resp.objects]
    return out
