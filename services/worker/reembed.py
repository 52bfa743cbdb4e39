"""Blue/green re-embedding of a catalog, through the ingestion queue.

The gateway's ReembedCatalog makes generation n+1 (empty, for the new model) beside the
live generation n and queues a plan task (visearch/catalogs.py, which owns the re-embedding's
Redis keys). From then on every ingest writes to both
generations (services/worker/pipeline.py), each embedded by its own model version; deletes
reach every generation. Then:

  plan     lists the live generation's items, records them in the job, queues batches;
  batch    embeds each item's stored objects (same boxes, the image read again from its
           kept source) with the new model into n+1, unless n+1 already holds that same
           ingest (same stamp: written by the dual write);
  finish   (once, by whichever batch completes the job) compares the two generations
           item by item (stamps) and repairs what changed meanwhile, then moves the alias:
           one atomic call; searches resolve the alias once per request, so each answer
           comes from one generation and one model;
  retire   after VISEARCH_RETIRE_AFTER_SECONDS, carries over anything still written to
           generation n by a worker that resolved the catalog before the switch, then
           drops generation n.

A job with failed items (an image no longer readable) does not switch: the catalog stays
on its model and generation n+1 is kept, still written to; a later ReembedCatalog resumes
it, re-embedding only what it lacks.
"""

from __future__ import annotations

import logging

import grpc
import redis
from celery import Celery

from services.worker.app import app, settings
from services.worker.pipeline import (
    INFRASTRUCTURE,
    Context,
    Transient,
    context,
    embed_objects,
    group_objects,
    read_uri,
    readable_roots,
    retry_later,
    run_batch,
)
from visearch import convert, imaging
from visearch import observability as obs
from visearch.queue import REEMBED_BATCH_TASK, REEMBED_PLAN_TASK, RETIRE_TASK
from visearch.store import Generation

log = logging.getLogger(__name__)
SUBMIT_CHUNK = 10_000
REPAIR_ROUNDS = 5


def chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def copy_items(ctx: Context, src: Generation, dst: Generation, item_ids: list[str]
               ) -> tuple[list[str], dict[str, str]]:
    """Make dst hold src's version of each item, embedded with dst's model: (done, failed -> reason).

    The item's objects keep their boxes (no detection); its image is read again from its source.
    An item src no longer has is removed from dst; one dst already holds at the same or a newer
    stamp is left alone."""
    rows = ctx.store.item_rows(src, item_ids)
    have = {i: objs[0].stamp for i, objs in ctx.store.item_rows(dst, list(rows)).items()}
    done: list[str] = [i for i in item_ids if i not in rows]
    if done:
        ctx.store.delete_items(dst, done)
    failed: dict[str, str] = {}
    todo = []
    for item_id, objs in rows.items():
        if have.get(item_id, -1) >= objs[0].stamp:
            done.append(item_id)
            continue
        if not objs[0].source:
            failed[item_id] = ("no copy of its image was kept (sent as bytes while VISEARCH_BLOB_DIR was unset): "
                               "ingest it again")
            continue
        try:
            todo.append((item_id, objs, read_uri(objs[0].source, readable_roots(ctx.settings))))
        except imaging.ImageError as exc:
            failed[item_id] = f"its image cannot be read again: {exc}"
    if todo:
        emb = embed_objects(ctx, [(data, o.box) for _, objs, data in todo for o in objs], dst.model_version,
                            ctx.settings.rpc_timeout_seconds, regions=dst.regions != "off")
        ctx.store.check_model(dst, convert.model_meta(emb.model))
        # An ingest may have written a newer version meanwhile (embedding takes a while): keep it. What
        # still races past this check is found by the repair rounds, which switch only when clean.
        now = {i: objs[0].stamp for i, objs in ctx.store.item_rows(dst, [i for i, _, _ in todo]).items()}
        newer = {i for i, objs, _ in todo if now.get(i, -1) > objs[0].stamp}
        flat = [i for i, objs, _ in todo for _ in objs]  # the item of each embedding
        emb_list = [e for i, e in zip(flat, emb.embeddings, strict=True) if i not in newer]
        done += sorted(newer)
        todo = [t for t in todo if t[0] not in newer]
        local_rows: dict[str, bytes] = {}
        per_item, region_rows = group_objects([i for i, objs, _ in todo for _ in objs],
                                              [o.box for _, objs, _ in todo for o in objs], emb_list, local_rows)
        ctx.store.upsert_local(dst, local_rows)
        ctx.store.upsert_items(dst, [(i, per_item[i], objs[0].metadata, objs[0].source, objs[0].stamp)
                                     for i, objs, _ in todo])
        ctx.store.upsert_regions(dst, region_rows)
        done += [i for i, _, _ in todo]
    return done, failed


def repair(ctx: Context, src: Generation, dst: Generation, newer_only: bool) -> tuple[int, dict[str, str]]:
    """Bring dst in step with src by stamps: items missing or different in dst are copied (only
    those newer in src when newer_only), items only dst has are removed (not when newer_only).
    (items copied, failed -> reason)."""
    a, b = ctx.store.item_stamps(src), ctx.store.item_stamps(dst)
    if not newer_only:
        extra = [i for i in b if i not in a]
        for part in chunks(extra, 1000):
            ctx.store.delete_items(dst, part)
    stale = [i for i, s in a.items() if (s > b.get(i, -1) if newer_only else b.get(i) != s)]
    failed: dict[str, str] = {}
    for part in chunks(stale, ctx.settings.ingest_batch):
        failed.update(copy_items(ctx, src, dst, part)[1])
    return len(stale), failed


def resolve(ctx: Context, catalog: str, number: int) -> tuple[Generation | None, Generation | None]:
    return ctx.store.live(catalog), ctx.store.generation(catalog, number)


def plan(ctx: Context, app: Celery, job_id: str, catalog: str, number: int, headers: dict) -> None:
    live, gen = resolve(ctx, catalog, number)
    if live is None or gen is None or live.number >= number:
        ctx.jobs.set_phase(job_id, "failed", f"generation {number} of catalog {catalog!r} is gone or already live",
                           close=True)
        return
    ids = sorted(ctx.store.item_stamps(live))
    kind = ctx.jobs.field(job_id, "kind") or "reembed"  # an adaptation's job goes on as its re-embedding
    for part in chunks(ids, SUBMIT_CHUNK):
        ctx.jobs.submit(job_id, catalog, part, {}, kind=kind)
    ctx.jobs.set_phase(job_id, "embedding", f"{len(ids)} items from generation {live.number} ({live.model_tag}) "
                                            f"into generation {number} ({gen.model_tag})")
    log.info("re-embedding planned", extra={"job_id": job_id, "catalog": catalog, "items": len(ids)})
    for part in chunks(ids, ctx.settings.ingest_batch):
        app.send_task(REEMBED_BATCH_TASK, args=[job_id, catalog, number, part], headers=headers)
    if not ids:
        finish(ctx, app, job_id, catalog, number)


def reembed(ctx: Context, catalog: str, number: int, item_ids: list[str]) -> tuple[list[str], dict[str, str]]:
    live, gen = resolve(ctx, catalog, number)
    if gen is None:
        return [], {i: f"generation {number} of catalog {catalog!r} is gone" for i in item_ids}
    if live is None or live.number >= number:  # redelivered after the switch: nothing left to do
        return list(item_ids), {}
    return copy_items(ctx, live, gen, item_ids)


def finish(ctx: Context, app: Celery, job_id: str, catalog: str, number: int) -> None:
    """Repair, switch, schedule the retirement: once per job (a Redis lock), idempotent if re-run."""
    lock = ctx.catalogs.finish_lock(job_id)
    if not lock.acquire():
        return
    try:
        st = ctx.jobs.status(job_id, max_failures=0)
        if st.phase in ("switched", "failed"):
            return
        if st.failed:
            ctx.jobs.set_phase(job_id, "failed", f"{st.failed} items could not be re-embedded (see failures): the "
                                                 f"catalog keeps its model; generation {number} is kept and "
                                                 "a new re-embedding resumes it", close=True)
            return
        live, gen = resolve(ctx, catalog, number)
        if live is None or gen is None or live.number >= number:
            ctx.jobs.set_phase(job_id, "failed", f"generation {number} is gone or already live", close=True)
            return
        ctx.jobs.set_phase(job_id, "switching", "bringing the new generation in step with the live one")
        # Items ingested or deleted while the batches ran; the switch waits for a round that finds
        # the two generations equal.
        for _ in range(REPAIR_ROUNDS):
            changed, failed = repair(ctx, live, gen, newer_only=False)
            if failed:
                ctx.jobs.mark_failed(job_id, failed)
                ctx.jobs.set_phase(job_id, "failed", f"{len(failed)} items changed during the re-embedding cannot "
                                                     "be re-embedded (see failures)", close=True)
                return
            if not changed:
                break
        else:
            ctx.jobs.set_phase(job_id, "failed", f"the catalog kept changing through {REPAIR_ROUNDS} repair rounds: "
                                                 f"not switched; a new re-embedding resumes generation {number}",
                               close=True)
            return
        ctx.store.switch(gen)
        obs.GENERATION_SWITCHES.labels(catalog).inc()
        ctx.jobs.set_phase(job_id, "switched", f"catalog {catalog!r} answers from generation {number} "
                                               f"({gen.model_tag}); generation {live.number} ({live.model_tag}) is "
                                               f"dropped in {ctx.settings.retire_after_seconds:.0f} s", close=True)
        log.info("catalog switched", extra={"job_id": job_id, "catalog": catalog, "generation": number})
        app.send_task(RETIRE_TASK, args=[catalog, live.number], countdown=ctx.settings.retire_after_seconds)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass


def retire(ctx: Context, catalog: str, number: int) -> dict:
    old, live = ctx.store.generation(catalog, number), ctx.store.live(catalog)
    if old is None:
        return {"dropped": False, "reason": "gone already"}
    if live is None or live.number <= number:
        log.warning("generation not retired: it is live or newer than the live one",
                    extra={"catalog": catalog, "generation": number})
        return {"dropped": False, "reason": "live"}
    # Writes that reached only the old generation (a worker resolved the catalog before the switch).
    carried, failed = repair(ctx, old, live, newer_only=True)
    if failed:  # keep it: the writes it alone holds must not be lost; the task is retried
        for item_id, reason in failed.items():
            log.error("late write not carried over: %s", reason, extra={"catalog": catalog, "item_id": item_id})
        raise Transient(f"{len(failed)} late writes of generation {number} not carried over")
    ctx.store.drop_generation(old)
    log.info("generation retired", extra={"catalog": catalog, "generation": number, "carried": carried})
    return {"dropped": True, "carried": carried, "failed": len(failed)}


def headers_of(task) -> dict:
    return {"request_id": (getattr(task.request, "headers", None) or {}).get("request_id", "")}


def guarded(task, ctx: Context, job_id: str, what: str, fn) -> None:
    """Run fn: infrastructure failures retry the task with backoff; giving up, or a bug, ends
    the job as failed with the reason (the catalog stays on its generation)."""
    try:
        fn()
    except INFRASTRUCTURE as exc:
        if task.request.retries < task.max_retries:
            delay = min(60, 2 ** task.request.retries)
            log.warning("%s retried in %ss: %s", what, delay, exc, extra={"job_id": job_id})
            retry_later(task, exc, delay)
        ctx.jobs.set_phase(job_id, "failed", f"{what} gave up after {task.max_retries} retries: {exc}", close=True)
    except Exception as exc:  # noqa: BLE001 - a bug ends the job with its reason, not a redelivery loop
        log.exception("%s failed", what, extra={"job_id": job_id})
        ctx.jobs.set_phase(job_id, "failed", f"{what}: internal error: {type(exc).__name__}: {exc}", close=True)


@app.task(name=REEMBED_PLAN_TASK, bind=True, max_retries=settings.max_retries)
def reembed_plan(self, job_id: str, catalog: str, number: int) -> dict:
    ctx = context(settings)
    guarded(self, ctx, job_id, "planning", lambda: plan(ctx, app, job_id, catalog, number, headers_of(self)))
    return {"job_id": job_id}


@app.task(name=REEMBED_BATCH_TASK, bind=True, max_retries=settings.max_retries)
def reembed_batch(self, job_id: str, catalog: str, number: int, item_ids: list[str]) -> dict:
    ctx = context(settings)
    done, failed = run_batch(self, ctx, job_id, item_ids, lambda ids: reembed(ctx, catalog, number, ids), str)
    obs.REEMBEDDED.labels(catalog, "done").inc(len(done))
    obs.REEMBEDDED.labels(catalog, "failed").inc(len(failed))

    def maybe_finish():
        st = ctx.jobs.status(job_id, max_failures=0)
        # "switching": a finish interrupted by an outage, taken up again by this retry.
        if st.pending == 0 and st.phase in ("embedding", "switching"):
            finish(ctx, app, job_id, catalog, number)

    # A retry re-runs the batch, which is cheap (its items are current now) and leads here again.
    guarded(self, ctx, job_id, "the switch", maybe_finish)
    return {"done": len(done), "failed": len(failed)}


@app.task(name=RETIRE_TASK, bind=True, max_retries=settings.max_retries)
def retire_generation(self, catalog: str, number: int) -> dict:
    try:
        return retire(context(settings), catalog, number)
    except (*INFRASTRUCTURE, grpc.RpcError) as exc:  # the old generation stays until a retry drops it
        retry_later(self, exc, min(300, 10 * 2 ** self.request.retries))
