"""Catalog adaptation as a job through the queue (visearch/adapting.py; docs/ADAPT.md).

The gateway's AdaptCatalog records a job (kind "adapt", phase "queued") and queues one task here:

  views     a sample of the live generation's items (up to max_objects of their stored objects,
            spread over the catalog) is embedded by the full-dimension model, each object as stored
            and as `views` made-up views; the job counts those items as its progress;
  fitting   learned whitening on those descriptors (numpy, seconds);
  writing   the projection appended to the graph, written as a new model version of this catalog
            (checked against numpy before it is published; never the model's default);
  then      the same job goes on as the catalog's blue/green re-embedding into that version
            (services/worker/reembed.py: planning, embedding, switching) and ends "switched".

A redelivered task (a worker that died) starts again from the views, unless its version was
written already (the job records it), in which case it goes straight to the re-embedding.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from services.worker.app import app, settings
from services.worker.pipeline import Context, context, embed_objects, read_uri, readable_roots
from services.worker.reembed import guarded, headers_of
from visearch import adapting, imaging
from visearch.embedding_model import prepare
from visearch.errors import FailedPrecondition
from visearch.inference import read_meta
from visearch.models.repository import read_record
from visearch.queue import ADAPT_TASK, REEMBED_PLAN_TASK

log = logging.getLogger(__name__)
MODEL = "embedder"
BATCH_ITEMS = 16
PARITY_OBJECTS = 4


def sample(ctx: Context, live, max_objects: int) -> list[tuple[str, list]]:
    """(item id, its stored objects) for items drawn from the whole catalog, up to `max_objects`
    objects in all (each item's objects are taken together). Items are taken in the order of a hash
    of their ids, not of the ids: ids often sort by product, and a fit on the first products alone
    measured below no adaptation at all (docs/ADAPT.md)."""
    ids = sorted(ctx.store.item_stamps(live), key=lambda i: hashlib.sha1(i.encode()).digest())
    out, n = [], 0
    for start in range(0, len(ids), 500):
        if n >= max_objects:
            break
        part = ids[start:start + 500]
        rows = ctx.store.item_rows(live, part)
        for item_id in part:
            objs = rows.get(item_id) or []
            if not objs or not objs[0].source or n >= max_objects:
                continue
            out.append((item_id, objs[:max_objects - n]))
            n += len(out[-1][1])
    return out


def vectors(answer) -> np.ndarray:
    return np.asarray([list(e.values) for e in answer.embeddings], np.float32)


def adapt(ctx: Context, job_id: str, catalog: str, views: int, max_objects: int, headers: dict) -> None:
    live = ctx.store.live(catalog)
    if live is None:
        ctx.jobs.set_phase(job_id, "failed", f"catalog {catalog!r} has no live generation", close=True)
        return
    repo = Path(ctx.settings.model_repository)
    written = ctx.jobs.field(job_id, "adapted_version")
    if not written:
        record = read_record(repo, MODEL, live.model_version)
        source = adapting.base_version(record)
        base = read_record(repo, MODEL, source)
        dim = adapting.target_dim(record, base)
        picked = sample(ctx, live, max_objects)
        n_objects = sum(len(objs) for _, objs in picked)
        if n_objects < 2:
            ctx.jobs.set_phase(job_id, "failed", f"catalog {catalog!r} has fewer than 2 objects whose images were "
                                                 "kept: nothing to adapt to", close=True)
            return
        ctx.jobs.submit(job_id, catalog, [i for i, _ in picked], {}, kind="adapt")
        ctx.jobs.set_phase(job_id, "views", f"{n_objects} objects of {len(picked)} items, {views} made-up views "
                                            f"each, embedded by {MODEL}:{source}")
        roots = readable_roots(ctx.settings)
        x: list[np.ndarray] = []
        seen: list[list[np.ndarray]] = [[] for _ in range(views)]
        check: list[np.ndarray] = []
        timeout = ctx.settings.rpc_timeout_seconds
        for start in range(0, len(picked), BATCH_ITEMS):
            part = picked[start:start + BATCH_ITEMS]
            objects, made, unread = [], [[] for _ in range(views)], {}
            for item_id, objs in part:
                try:
                    data = read_uri(objs[0].source, roots)
                    img = imaging.decode_image(data)  # once per item, for all its objects' views
                except imaging.ImageError as exc:  # gone since: adapt to the rest
                    unread[item_id] = str(exc)
                    continue
                for j, o in enumerate(objs):
                    objects.append((data, o.box))
                    for k in range(views):
                        made[k].append((adapting.view_of(img, o.box, adapting.view_seed(catalog, f"{item_id}#{j}", k)),
                                        None))
            if objects:
                x.append(vectors(embed_objects(ctx, objects, str(source), timeout, regions=False, local=False)))
                for k in range(views):
                    seen[k].append(vectors(embed_objects(ctx, made[k], str(source), timeout, regions=False,
                                                         local=False)))
                check += [prepare(d, b, int(base.input_size))[0]
                          for d, b in objects[:max(0, PARITY_OBJECTS - len(check))]]
            ctx.jobs.mark_done(job_id, [i for i, _ in part if i not in unread])
            if unread:
                ctx.jobs.mark_failed(job_id, {i: f"its image cannot be read again: {r}" for i, r in unread.items()})
        X = np.concatenate(x)
        V = [np.concatenate(s) for s in seen]
        ctx.jobs.set_phase(job_id, "fitting", f"learned whitening of {len(X)} objects and {views} views each, "
                                              f"{X.shape[1]} -> {dim} dimensions")
        w, b = adapting.fit(X, V, dim)
        ctx.jobs.set_phase(job_id, "writing", f"the adapted version of {MODEL}:{source}")
        rec = adapting.write_version(repo, MODEL, source, w, b, catalog,
                                     {"views": views, "objects": int(len(X)), "items": len(picked)}, np.stack(check))
        written = str(rec.version)
        ctx.jobs.set_field(job_id, "adapted_version", written)
        log.info("adapted version written", extra={"job_id": job_id, "catalog": catalog, "model": f"{MODEL}:{written}",
                                                   "objects": len(X)})
    meta = read_meta(repo, MODEL, written)
    live = ctx.store.live(catalog)

    def queue(jid: str, number: int) -> None:
        app.send_task(REEMBED_PLAN_TASK, args=[jid, catalog, number], headers=headers)

    try:
        ctx.catalogs.start_reembed(catalog, live, meta, queue, job_id=job_id)
    except FailedPrecondition as exc:  # another re-embedding of the catalog is under way
        ctx.jobs.set_phase(job_id, "failed", f"{MODEL}:{written} was written, but {exc}", close=True)


@app.task(name=ADAPT_TASK, bind=True, max_retries=settings.max_retries)
def adapt_catalog(self, job_id: str, catalog: str, views: int, max_objects: int) -> dict:
    ctx = context(settings)
    guarded(self, ctx, job_id, "adaptation", lambda: adapt(ctx, job_id, catalog, views, max_objects, headers_of(self)))
    return {"job_id": job_id}
