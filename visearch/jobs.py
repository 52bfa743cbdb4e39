"""Ingestion jobs in Redis: counts that always add up, however often a task re-runs.

Per job:
  vs:job:<id>          hash   catalog, created_at, updated_at; kind ("ingest" or "reembed"),
                              phase and message (re-embedding), open (1 while the job is
                              not finished whatever its counts: a re-embedding until it switched)
  vs:job:<id>:items    set    every item id submitted (re-submitting one counts once)
  vs:job:<id>:done     set    items stored
  vs:job:<id>:failed   hash   item -> reason, for items that cannot be stored
  vs:blob:<id>:<item>  string image bytes sent inline, until the item is processed
  vs:jobs              zset   every job id by creation time (listing; trimmed to the TTL)
done and failed never share an item (finishing one removes it from the other), so
submitted == done + failed + pending with pending = submitted - done - failed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import redis

from visearch.errors import InvalidArgument, NotFound

PREFIX = "vs:job:"
INDEX = "vs:jobs"


@dataclass
class JobStatus:
    job_id: str
    catalog: str
    submitted: int
    done: int
    failed: int
    failures: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    kind: str = "ingest"
    phase: str = ""
    message: str = ""
    open: bool = False

    @property
    def pending(self) -> int:
        return self.submitted - self.done - self.failed

    @property
    def finished(self) -> bool:
        return self.pending == 0 and not self.open


def new_job_id() -> str:
    return uuid.uuid4().hex


def _keys(job_id: str) -> tuple[str, str, str, str]:
    base = PREFIX + job_id
    return base, base + ":items", base + ":done", base + ":failed"


def blob_key(job_id: str, item_id: str) -> str:
    return f"vs:blob:{job_id}:{item_id}"


class Jobs:
    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.r = client
        self.ttl = ttl_seconds

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int) -> Jobs:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2), ttl_seconds)

    def submit(self, job_id: str, catalog: str, item_ids: list[str], blobs: dict[str, bytes]) -> None:
        """Record items as pending (and stage inline bytes) before their tasks are queued."""
        base, items, done, failed = _keys(job_id)
        existing = self.r.hget(base, "catalog")
        if existing is not None and existing.decode() != catalog:
            raise InvalidArgument(f"job {job_id} belongs to catalog {existing.decode()!r}, not {catalog!r}")
        now = time.time()
        p = self.r.pipeline(transaction=True)
        p.hsetnx(base, "catalog", catalog)
        p.hsetnx(base, "created_at", now)
        self._index(p, job_id, now)
        p.hset(base, "updated_at", now)
        if item_ids:
            p.sadd(items, *item_ids)
            # A re-submitted item is pending again until this submission is processed.
            p.srem(done, *item_ids)
            p.hdel(failed, *item_ids)
        for item_id, data in blobs.items():
            p.set(blob_key(job_id, item_id), data, ex=self.ttl)
        for k in (base, items, done, failed):
            p.expire(k, self.ttl)
        p.execute()

    def create(self, job_id: str, catalog: str, kind: str, phase: str, **fields) -> None:
        """A job that stays open (unfinished) until `close`, whatever its counts."""
        base = _keys(job_id)[0]
        now = time.time()
        p = self.r.pipeline(transaction=True)
        p.hset(base, mapping={"catalog": catalog, "created_at": now, "updated_at": now, "kind": kind, "phase": phase,
                              "message": "", "open": 1, **fields})
        self._index(p, job_id, now)
        p.expire(base, self.ttl)
        p.execute()

    def _index(self, p, job_id: str, now: float) -> None:
        p.zadd(INDEX, {job_id: now}, nx=True)
        p.zremrangebyscore(INDEX, "-inf", now - self.ttl)

    def recent(self, limit: int, catalogs=None, scan: int = 2000) -> list[JobStatus]:
        """The newest jobs, newest first, of the catalogs `catalogs(name) -> bool` accepts (all when None);
        at most `scan` jobs are looked at."""
        out: list[JobStatus] = []
        ids = [j.decode() for j in self.r.zrevrange(INDEX, 0, scan - 1)]
        for start in range(0, len(ids), 100):  # one round trip per 100 jobs
            page = ids[start:start + 100]
            p = self.r.pipeline(transaction=False)
            for job_id in page:
                base, items, done, failed = _keys(job_id)
                p.hgetall(base)
                p.scard(items)
                p.scard(done)
                p.hlen(failed)
            res = p.execute()
            for n, job_id in enumerate(page):
                head, submitted, n_done, n_failed = res[4 * n:4 * n + 4]
                if not head:  # expired
                    continue
                st = self._status(job_id, head, submitted, n_done, n_failed, {})
                if catalogs is None or catalogs(st.catalog):
                    out.append(st)
                    if len(out) >= limit:
                        return out
        return out

    def set_phase(self, job_id: str, phase: str, message: str = "", close: bool = False) -> None:
        mapping = {"phase": phase, "message": message[:2000], "updated_at": time.time()}
        if close:
            mapping["open"] = 0
        self.r.hset(_keys(job_id)[0], mapping=mapping)

    def field(self, job_id: str, name: str) -> str | None:
        v = self.r.hget(_keys(job_id)[0], name)
        return v.decode() if v is not None else None

    def blob(self, job_id: str, item_id: str) -> bytes | None:
        return self.r.get(blob_key(job_id, item_id))

    def blobs(self, job_id: str, item_ids: list[str]) -> list[bytes | None]:
        """`blob` of several items in one round trip."""
        return self.r.mget([blob_key(job_id, i) for i in item_ids]) if item_ids else []

    def is_done(self, job_id: str, item_id: str) -> bool:
        """Whether the item is already stored for this job (its bytes are then deleted)."""
        return bool(self.r.sismember(_keys(job_id)[2], item_id))

    def mark_done(self, job_id: str, item_ids: list[str]) -> None:
        if item_ids:
            self._finish(job_id, item_ids, None)

    def mark_failed(self, job_id: str, reasons: dict[str, str]) -> None:
        for item_id, reason in reasons.items():
            self._finish(job_id, [item_id], reason)

    def _finish(self, job_id: str, item_ids: list[str], reason: str | None) -> None:
        base, _, done, failed = _keys(job_id)
        p = self.r.pipeline(transaction=True)
        if reason is None:
            p.sadd(done, *item_ids)
            p.hdel(failed, *item_ids)
        else:
            p.hset(failed, mapping={i: reason[:1000] for i in item_ids})
            p.srem(done, *item_ids)
        p.hset(base, "updated_at", time.time())
        p.delete(*(blob_key(job_id, i) for i in item_ids))
        p.execute()

    def status(self, job_id: str, max_failures: int = 1000) -> JobStatus:
        base, items, done, failed = _keys(job_id)
        p = self.r.pipeline(transaction=True)
        p.hgetall(base)
        p.scard(items)
        p.scard(done)
        p.hlen(failed)
        if max_failures > 0:  # HSCAN ... COUNT 0 is a syntax error to Redis once the hash exists
            p.hscan(failed, 0, count=max_failures)
        head, submitted, n_done, n_failed, *scan = p.execute()
        failures = scan[0][1] if scan else {}
        if not head:
            raise NotFound(f"ingest job {job_id!r} does not exist (or has expired)")
        return self._status(job_id, head, submitted, n_done, n_failed, failures, max_failures)

    @staticmethod
    def _status(job_id: str, head: dict, submitted: int, n_done: int, n_failed: int, failures: dict,
                max_failures: int = 0) -> JobStatus:
        return JobStatus(
            job_id=job_id,
            catalog=head[b"catalog"].decode(),
            submitted=submitted,
            done=n_done,
            failed=n_failed,
            failures={k.decode(): v.decode() for k, v in list(failures.items())[:max_failures]},
            created_at=float(head.get(b"created_at", 0)),
            updated_at=float(head.get(b"updated_at", 0)),
            kind=head.get(b"kind", b"ingest").decode(),
            phase=head.get(b"phase", b"").decode(),
            message=head.get(b"message", b"").decode(),
            open=head.get(b"open", b"0") == b"1",
        )

    def ping(self) -> bool:
        return bool(self.r.ping())
