"""The worker's steps: load -> decode -> detect -> embed (batched) -> upsert, and the batch runner
that records each outcome in its job and retries what infrastructure failures interrupt. The Celery
tasks are services/worker/ingest.py's and services/worker/reembed.py's.

Idempotent per item id: rows are upserted under deterministic ids and job
bookkeeping uses sets, so a task that runs twice (a worker died after storing,
before acknowledging) leaves exactly the same state as one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import redis
from celery.exceptions import Reject
from pymilvus.exceptions import MilvusException

from visearch import convert, files, imaging
from visearch import duplicates as dup
from visearch import observability as obs
from visearch.catalogs import Catalogs
from visearch.common.v1 import common_pb2
from visearch.detection.v1 import detection_pb2, detection_pb2_grpc
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.errors import InvalidArgument, NotFound
from visearch.grpcserver import split_by_bytes, sync_channel, too_large
from visearch.jobs import Jobs
from visearch.settings import WorkerSettings
from visearch.store import VectorStore, WriteClock

log = logging.getLogger(__name__)

# Statuses worth retrying: the dependency may come back. Anything else is final.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Transient(Exception):
    """A dependency is down or slow; the whole batch is retried later."""


# NotFound: a collection that went away under a batch (retired, or lost by Milvus): the retry
# resolves the catalog's generations again.
# A write claim lasts far longer than the write it covers (a second or so); one left by a worker killed
# mid-write holds that item's newer submission back until it expires.
CLAIM_TTL_MS = 5 * 60 * 1000
INFRASTRUCTURE = (Transient, MilvusException, NotFound, redis.ConnectionError, redis.TimeoutError)


class Context:
    """Per-process clients, made after the fork (gRPC channels must not cross one)."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.detection = detection_pb2_grpc.DetectionServiceStub(sync_channel(settings.detection_addr, settings))
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(sync_channel(settings.embedding_addr, settings))
        self.jobs = Jobs.from_url(settings.redis_url, settings.job_ttl_seconds)
        self.store = VectorStore(settings, WriteClock(self.jobs.r))
        self.catalogs = Catalogs(self.store, self.jobs, settings.job_ttl_seconds)


_ctx: tuple[int, Context] | None = None


def context(settings: WorkerSettings) -> Context:
    global _ctx
    if _ctx is None or _ctx[0] != os.getpid():
        _ctx = (os.getpid(), Context(settings))
    return _ctx[1]


def read_uri(uri: str, within: list[Path] | None = None) -> bytes:
    """An item's image from its path: a regular file, opened without blocking or following a final
    symlink, size-checked before reading (imaging.read_file); with `within`, only when the file
    opened lies inside one of those folders (a folder on the way swapped for a symlink after the
    gateway checked the path cannot lead outside them)."""
    try:
        return files.read_file(Path(uri.removeprefix("file://")), within=within)
    except files.ReadError as exc:
        raise imaging.ImageError(str(exc)) from None


def _call(fn, request, timeout: float, what: str):
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in TRANSIENT and not too_large(exc):
            raise Transient(f"{what} service: {exc.code().name}: {exc.details()}") from None
        raise


def process(ctx: Context, job_id: str, catalog: str, items: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Ingest a batch; returns (stored item ids, failed item id -> reason)."""
    timeout = ctx.settings.rpc_timeout_seconds
    failed: dict[str, str] = {}
    already: list[str] = []
    ok: list[tuple[dict, bytes, tuple[int, int]]] = []
    # A submission that a later request of the same job superseded is not worked on: the later
    # one's task stores the item and counts it.
    latest = ctx.jobs.latest(job_id, [i["item_id"] for i in items if i.get("seq") is not None])
    items = [i for i in items if i.get("seq") is None or latest.get(i["item_id"], i["seq"]) <= i["seq"]]
    inline = [item["item_id"] for item in items if not item.get("uri")]
    blobs = dict(zip(inline, ctx.jobs.blobs(job_id, inline), strict=True))
    for item in items:
        item_id = item["item_id"]
        try:
            if item.get("uri"):
                data = read_uri(item["uri"], readable_roots(ctx.settings))
            else:
                data = blobs[item_id]
                if data is None and ctx.jobs.is_done(job_id, item_id):
                    # A redelivered batch (worker killed after storing, before the ack; or the
                    # visibility timeout passed): the item is stored and its bytes are gone by
                    # design. Done, not failed, and not stored twice.
                    already.append(item_id)
                    continue
                if data is None:
                    raise imaging.ImageError("image bytes expired or missing before the item was processed")
            # The header is enough here (the size, for the full frame's box): the services decode
            # every image anyway, and one whose header reads but whose pixels do not is refused
            # there (INVALID_ARGUMENT), which makes run_batch retry the batch unit by unit so
            # that image fails alone with the decoder's reason.
            ok.append((item, data, imaging.image_size(data)))
        except imaging.ImageError as exc:
            failed[item_id] = str(exc)
    if not ok:
        return already, failed

    objects = catalog_objects(ctx, ok, timeout)
    stamp = time.time_ns()
    sources = [item.get("uri") or keep_blob(ctx.settings.blob_dir, data) for item, data, _ in ok]
    # An existing catalog is written in each of its generations: the live one and, during a
    # re-embedding, the one being built, each with the model version that made it. A new
    # catalog is made for the serving default.
    targets = ctx.store.write_targets(catalog) or [None]
    first = {item["item_id"]: n for n, (item, _, _) in enumerate(ok)}
    dup_modes = {item["item_id"]: item["duplicates"] for item, _, _ in ok if item.get("duplicates") in ("report", "skip")}
    skipped: list[str] = []

    def write(gen, claim: bool):
        mode = gen.regions if gen else ctx.store.settings.catalog_regions
        emb = embed_objects(ctx, [(ok[n][1], box) for n, box in objects], gen.model_version if gen else "", timeout,
                            regions=mode != "off")
        meta = convert.model_meta(emb.model)
        if gen is None:
            gen = ctx.catalogs.ensure(catalog, meta)
        else:
            ctx.store.check_model(gen, meta)
        local_rows: dict[str, bytes] = {}
        per_item, region_rows = group_objects([ok[n][0]["item_id"] for n, _ in objects],
                                              [box for _, box in objects], emb.embeddings, local_rows)
        if dup_modes and claim and targets[0] is not None:
            # Near-duplicates of what the catalog holds (live generation, before this batch is written).
            found = same_pictures(ctx, gen, {i: per_item[i] for i in dup_modes if i in per_item},
                                  {i: ok[first[i]][1] for i in dup_modes}, local_rows)
            ctx.jobs.record_duplicates(job_id, {i: (of, dup_modes[i] == "skip") for i, of in found.items()})
            skipped.extend(i for i in found if dup_modes[i] == "skip")
        if skipped:
            drop = set(skipped)
            per_item = {i: objs for i, objs in per_item.items() if i not in drop}
            region_rows = [r for r in region_rows if r[0].rsplit("#", 1)[0] not in drop]
            local_rows = {o: f for o, f in local_rows.items() if o.rsplit("#", 1)[0] not in drop}
        rows = [(item_id, objs, ok[first[item_id]][0].get("metadata") or {}, sources[first[item_id]], stamp)
                for item_id, objs in per_item.items()]
        # The live generation's write holds the items' claims (visearch.jobs): a superseded submission
        # never overwrites a newer one stored first.
        with claimed(ctx, job_id, {i["item_id"]: i.get("seq") for i, _, _ in ok} if claim else {}) as keep:
            if keep is not None:
                rows = [r for r in rows if r[0] in keep]
                region_rows = [r for r in region_rows if r[0].rsplit("#", 1)[0] in keep]
            # Global vectors first, then regions: a crash in between leaves the item searchable and
            # re-ranked on its global score until the redelivered task stores its regions.
            if rows:
                # Local features first (files, by object id): a row is never visible without them.
                ctx.store.upsert_local(gen, {o: f for o, f in local_rows.items() if keep is None
                                             or o.rsplit("#", 1)[0] in keep})
                ctx.store.upsert_items(gen, rows)
                ctx.store.upsert_regions(gen, region_rows)
        return [r[0] for r in rows]

    stored = write(targets[0], claim=True) + skipped  # a skipped duplicate is done: nothing to store
    for gen in targets[1:]:
        # The generation being built: best effort. What it misses (its model undeployed, Milvus
        # hiccup) the re-embedding's repair finds by stamp and copies before any switch.
        try:
            write(gen, claim=False)
        except Exception as exc:  # noqa: BLE001 - the ingest itself succeeded on the live generation
            log.warning("not written to generation %s being built: %s", gen.number, exc,
                        extra={"job_id": job_id, "catalog": catalog})
    return stored + already, failed


def same_pictures(ctx: Context, gen, objects: dict[str, list], images: dict[str, bytes], local_rows: dict[str, bytes]
                  ) -> dict[str, str]:
    """item -> the stored item whose image is the same picture (visearch.duplicates), for the items
    given (their objects [(vector, box)] and image bytes)."""
    params = dup.DuplicateParams()
    full = {i: max(range(len(objs)), key=lambda k: dup.box_area(objs[k][1])) for i, objs in objects.items()}
    wanted = dup.nearest(ctx.store, gen, {i: objects[i][k][0] for i, k in full.items()}, params) if objects else {}
    stored = ctx.store.item_rows(gen, sorted({c for cs in wanted.values() for c in cs}))
    frames = {c: max(objs, key=lambda o: dup.box_area(o.box)) for c, objs in stored.items()}
    feats = ctx.store.get_local(gen, [o.object_id for o in frames.values()])
    pictures: dict[str, dup.Picture | None] = {}

    def stored_picture(c: str) -> dup.Picture | None:
        if c not in pictures:
            o = frames[c]
            try:
                data = read_uri(o.source, readable_roots(ctx.settings))
            except imaging.ImageError:  # its image is gone: it cannot be compared
                data = None
            pictures[c] = dup.picture_from(data, feats.get(o.object_id))
        return pictures[c]

    out = {}
    for i, candidates in wanted.items():
        mine = dup.picture_from(images[i], local_rows.get(f"{i}#{full[i]}")) if candidates else None
        if mine is None:
            continue
        for c in candidates:  # nearest first
            theirs = stored_picture(c) if c in frames else None
            if theirs is not None and dup.compare(mine, theirs, params).same(params):
                out[i] = c
                break
    return out


def readable_roots(settings: WorkerSettings) -> list[Path] | None:
    """Where item paths may lead when read: the ingest roots and the blob folder (None: unchecked,
    when no roots are configured for the worker)."""
    if not settings.ingest_roots:
        return None
    return [*settings.ingest_roots, *([Path(settings.blob_dir)] if settings.blob_dir else [])]


@contextlib.contextmanager
def claimed(ctx: Context, job_id: str, seqs: dict[str, int | None], wait: float = 30.0):
    """Hold the write claim of these items' submissions while writing them; yields the items to
    write (None: no claims asked for). A submission superseded meanwhile is dropped; one whose item
    another task is writing waits for it (a few hundred ms), or the batch is retried."""
    if not seqs:
        yield None
        return
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait
    while True:  # all or nothing, so two tasks never wait on each other's halves
        keep, stale, busy = ctx.jobs.claim(job_id, seqs, token, ttl_ms=CLAIM_TTL_MS)
        if not busy:
            break
        if time.monotonic() > deadline:
            raise Transient(f"{len(busy)} items are being written by another task of job {job_id}")
        seqs = {i: s for i, s in seqs.items() if i not in stale}
        time.sleep(0.05)
    try:
        yield set(keep)
    finally:
        ctx.jobs.release(job_id, keep, token)


def embed_objects(ctx: Context, objects: list[tuple[bytes, tuple | None]], version: str, timeout: float,
                  regions: bool = True, local: bool = True):
    """Embed (image bytes, box in pixels or None: the whole image) pairs with one model version, local
    features as configured (unless `local` is False) and regions when the catalog stores them
    (`regions`) and the worker's settings allow."""
    want_local = local and ctx.settings.ingest_local_features and ctx.store.local is not None
    items = [embedding_pb2.EmbedItem(image=data, box=common_pb2.BoundingBox(x1=b[0], y1=b[1], x2=b[2], y2=b[3]))
             if b is not None else embedding_pb2.EmbedItem(image=data) for data, b in objects]
    parts = split_by_bytes(items, lambda it: len(it.image))  # each object carries its image's bytes
    answers = [_call(ctx.embedding.Embed, embedding_pb2.EmbedRequest(items=part, regions=regions and ctx.settings.ingest_regions,
                                                                     model_version=version, local_features=want_local),
                     timeout, "embedding")
               for part in parts]
    if len(answers) == 1:
        return answers[0]
    merged = embedding_pb2.EmbedResponse()
    merged.model.CopyFrom(answers[0].model)
    for a in answers:
        if a.model.version != merged.model.version:
            raise Transient("the embedding model changed between the parts of one batch")
        merged.embeddings.extend(a.embeddings)
    return merged


def group_objects(item_ids: list[str], boxes: list[tuple], embeddings, local_rows: dict | None = None
                  ) -> tuple[dict[str, list], list]:
    """Per item, its objects [(vector, box)] in order; and the region rows (object id, features, boxes).
    With `local_rows`, each object's local features are added to it (object id -> bytes)."""
    per_item: dict[str, list] = {}
    region_rows = []
    for item_id, box, vec in zip(item_ids, boxes, embeddings, strict=True):
        objs = per_item.setdefault(item_id, [])
        if local_rows is not None and vec.local_features:
            local_rows[f"{item_id}#{len(objs)}"] = vec.local_features
        if vec.HasField("regions") and vec.regions.boxes:
            r = vec.regions
            feats = np.asarray(r.features, np.float32).reshape(len(r.boxes), r.dim)
            rboxes = np.asarray([(b.x1, b.y1, b.x2, b.y2) for b in r.boxes], np.float32)
            region_rows.append((f"{item_id}#{len(objs)}", feats, rboxes))
        objs.append((list(vec.values), box))
    return per_item, region_rows


def keep_blob(blob_dir: str, data: bytes) -> str:
    """Keep image bytes under their SHA-256 so a re-embedding can read them again; their path
    ("" when no blob dir is set). Written once, atomically: concurrent writers agree."""
    if not blob_dir:
        return ""
    digest = hashlib.sha256(data).hexdigest()
    path = Path(blob_dir) / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def catalog_objects(ctx, ok: list, timeout: float) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(index into ok, box in pixels) of every object to store, by the ingest_objects policy:
    each detected box ("detected", the full frame when none), those and the full frame
    ("detected+full"), or only the full frame ("full", no detection call)."""
    policy = ctx.settings.ingest_objects
    full = [(0.0, 0.0, float(w), float(h)) for _, _, (w, h) in ok]
    if policy == "full":
        return list(enumerate(full))
    results = []
    for part in split_by_bytes([d for _, d, _ in ok], len):
        det = _call(ctx.detection.Detect, detection_pb2.DetectRequest(images=part,
                                                                      max_detections=ctx.settings.ingest_max_objects),
                    timeout, "detection")
        if len(det.results) != len(part):
            raise RuntimeError(f"detection answered {len(det.results)} results for {len(part)} images")
        results += det.results
    objects = []
    for n, res in enumerate(results):
        boxes = [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in res.detections][:ctx.settings.ingest_max_objects]
        if policy == "detected+full" or not boxes:
            boxes = [full[n], *boxes]
        objects += [(n, b) for b in boxes]
    return objects


def retry_later(task, exc: BaseException, countdown: float):
    """Retry the task in `countdown` s. Celery publishes the retry as a new message and, when it
    cannot (the broker is down or just restarted), rejects the running one *without* requeueing it:
    that batch would be lost. Then the message is rejected with requeue instead: put back on its
    queue, or, if the broker cannot take even that, left unacknowledged and delivered again after
    the visibility timeout."""
    try:
        # Celery's idiom: retry raises Retry once published (or returns it when told not to throw).
        raise task.retry(exc=exc, countdown=countdown)
    except Reject as rej:
        log.warning("retry not published (%s): the batch goes back to its queue", rej.reason)
        raise Reject(rej.reason, requeue=True) from None


def run_batch(task, ctx: Context, job_id: str, units: list, fn, unit_id, before_record=None
              ) -> tuple[list[str], dict[str, str]]:
    """Run fn(units) -> (done ids, failed id -> reason) for a bound Celery task and record the outcome
    in the job (`before_record(done, failed)` runs just before). Infrastructure failures retry the
    whole batch with backoff; a final answer from a dependency (e.g. INVALID_ARGUMENT) retries unit
    by unit, so one bad image cannot fail its batch; a bug fails the units with its reason instead
    of looping."""
    headers = getattr(task.request, "headers", None) or {}
    obs.bind_request_id(getattr(task.request, "request_id", None) or headers.get("request_id") or job_id[:16])
    t0 = time.perf_counter()

    def one_by_one() -> tuple[list[str], dict[str, str]]:
        done, failed = [], {}
        for unit in units:
            try:
                d, f = fn([unit])
            except grpc.RpcError as one:
                d, f = [], {unit_id(unit): f"{one.code().name}: {one.details()}"}
            except InvalidArgument as one:
                d, f = [], {unit_id(unit): one.message}
            done += d
            failed.update(f)
        return done, failed

    try:
        try:
            done, failed = fn(units)
        except (grpc.RpcError, InvalidArgument):
            if len(units) == 1:
                raise
            # A final answer for the batch (e.g. one image the services cannot decode): unit by
            # unit, so it fails alone. A dependency going away meanwhile retries the whole batch
            # below (what was stored already is stored again under the same ids: idempotent).
            done, failed = one_by_one()
    except INFRASTRUCTURE as exc:
        if task.request.retries < task.max_retries:
            delay = min(60, 2 ** task.request.retries)
            log.warning("batch retried in %ss: %s", delay, exc, extra={"job_id": job_id})
            retry_later(task, exc, delay)
        done, failed = [], {unit_id(u): f"gave up after {task.max_retries} retries: {exc}" for u in units}
    except grpc.RpcError as exc:
        done, failed = [], {unit_id(units[0]): f"{exc.code().name}: {exc.details()}"}
    except InvalidArgument as exc:
        done, failed = [], {unit_id(units[0]): exc.message}
    except Exception as exc:  # noqa: BLE001 - a bug must fail the items with a reason, not loop forever
        log.exception("batch failed", extra={"job_id": job_id})
        done, failed = [], {unit_id(u): f"internal error: {type(exc).__name__}: {exc}" for u in units}
    seqs = {unit_id(u): u.get("seq") for u in units if isinstance(u, dict)} or None
    if before_record is not None:
        before_record(done, failed)
    try:
        ctx.jobs.mark_done(job_id, done, seqs)
        ctx.jobs.mark_failed(job_id, failed, seqs)
    except redis.RedisError as exc:  # Redis away or full: the batch runs again (idempotent) until recorded
        if task.request.retries < task.max_retries:
            log.warning("outcome not recorded, batch retried: %s", exc, extra={"job_id": job_id})
            retry_later(task, exc, min(60, 2 ** task.request.retries))
        raise
    obs.INGEST_BATCH_SECONDS.observe(time.perf_counter() - t0)
    return done, failed
