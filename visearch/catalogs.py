"""The one owner of catalogs' lifecycle: making a catalog, and the re-embedding of one into a new
generation (blue/green, services/worker/reembed.py), with the Redis state that goes with it.

Redis keys owned here:
  vs:reembed:<catalog>          string  the job id of the catalog's re-embedding under way
  vs:reembed-start:<catalog>    lock    held while a re-embedding is being started (one at a time)
  vs:reembed-finish:<job id>    lock    held by the one batch that repairs and switches (once per job)

The gateway (services/gateway) and the workers (services/worker) both go through `Catalogs`; the
generations themselves are the vector store's (visearch/store.py), the job records visearch/jobs.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from visearch.errors import FailedPrecondition, NotFound, Unavailable
from visearch.inference import ModelMeta
from visearch.jobs import Jobs, new_job_id
from visearch.store import Generation, VectorStore

log = logging.getLogger(__name__)
RUNNING = "vs:reembed:"
START_LOCK = "vs:reembed-start:"
FINISH_LOCK = "vs:reembed-finish:"
# A re-embedding recorded but still "planning" after this long was never queued (its gateway died).
UNPLANNED_AFTER = 60


class Catalogs:
    def __init__(self, store: VectorStore, jobs: Jobs, job_ttl_seconds: int):
        self.store = store
        self.jobs = jobs
        self.job_ttl = job_ttl_seconds

    # ---- catalogs ---------------------------------------------------------------------------
    def ensure(self, catalog: str, meta: ModelMeta, regions: str = "", index: str = "") -> Generation:
        """The catalog's live generation, made (for `meta`, with `regions` storage and an `index`
        vector index) if it has none."""
        return self.store.ensure_catalog(catalog, meta, regions, index)

    # ---- re-embedding -----------------------------------------------------------------------
    def start_reembed(self, catalog: str, live: Generation, meta: ModelMeta,
                      queue: Callable[[str, int], None], job_id: str = "") -> tuple[str, int]:
        """(job id, generation) of the catalog's re-embedding into `meta`: the one under way, or a new
        one, whose plan `queue(job_id, generation)` sends to the workers. `job_id`: an open job of the
        caller's that the re-embedding continues (an adaptation's), instead of a new one."""
        # One re-embedding per catalog at a time; a lock so two calls cannot both start one.
        lock = self.jobs.r.lock(f"{START_LOCK}{catalog}", timeout=60, blocking_timeout=10, thread_local=False)
        if not lock.acquire():
            raise Unavailable(f"another re-embedding of catalog {catalog!r} is starting: try again")
        try:
            building = self.store.building(catalog, live)
            if building is not None and building.model_tag != meta.tag:
                raise FailedPrecondition(f"catalog {catalog!r} is being re-embedded into generation {building.number} "
                                         f"({building.model_tag}); it must finish (or its generation be dropped) first")
            running = self.jobs.r.get(f"{RUNNING}{catalog}")
            if building is not None and running:
                try:
                    st = self.jobs.status(running.decode(), 0)
                except NotFound:  # expired
                    st = None
                if st is not None and not st.finished:  # already under way: that job, not a second one
                    if st.phase == "planning" and time.time() - st.updated_at > UNPLANNED_AFTER:
                        # Recorded but never planned (a gateway that died before queueing it): queue it now;
                        # planning twice re-embeds nothing twice (items already current are skipped).
                        queue(st.job_id, building.number)
                    return st.job_id, building.number
            if building is None:  # else resume it: only what it lacks is re-embedded
                building = self.store.create_generation(catalog, meta)
            if job_id:
                self.jobs.set_phase(job_id, "planning", fields={"generation": str(building.number), "model": meta.tag})
            else:
                job_id = new_job_id()
                self.jobs.create(job_id, catalog, "reembed", "planning", generation=building.number, model=meta.tag)
            self.jobs.r.set(f"{RUNNING}{catalog}", job_id, ex=self.job_ttl)
            try:
                queue(job_id, building.number)
            except Exception as exc:
                self.jobs.set_phase(job_id, "failed", f"could not be queued: {exc}", close=True)
                raise Unavailable(f"the queue refused the re-embedding ({exc}): try again") from None
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # expired meanwhile
                pass
        log.info("re-embedding queued", extra={"job_id": job_id, "catalog": catalog, "generation": building.number,
                                               "model": meta.tag})
        return job_id, building.number

    def finish_lock(self, job_id: str):
        """The lock of a re-embedding's finish (repair and switch): taken without waiting, by one batch."""
        return self.jobs.r.lock(f"{FINISH_LOCK}{job_id}", timeout=3600, blocking=False)
