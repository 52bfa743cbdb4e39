"""Ingestion jobs in Redis: counts that always add up, however often a task re-runs.

Per job:
  vs:job:<id>          hash   catalog, created_at, updated_at; kind ("ingest" or "reembed"),
                              phase and message (re-embedding), open (1 while the job is
                              not finished whatever its counts: a re-embedding until it switched)
  vs:job:<id>:items    set    every item id submitted (re-submitting one counts once)
  vs:job:<id>:done     set    items stored
  vs:job:<id>:failed   hash   item -> reason, for items that cannot be stored
  vs:job:<id>:seq      hash   item -> how many times the job submitted it (its latest submission)
  vs:job:<id>:w:<item> string a worker writing the item's latest submission (a short claim)
  vs:blob:<id>:<item>  string image bytes sent inline, until the item is processed
  vs:jobs              zset   every job id by creation time (listing; trimmed to the TTL)
done and failed never share an item (finishing one removes it from the other), so
submitted == done + failed + pending with pending = submitted - done - failed.

A job may submit an item again in a later request (IngestItems with the same job_id). Each
submission gets the next number of the item's counter, which travels with its task; only the
outcome of the latest submission counts (an earlier one finishing later changes nothing), so an
item is pending until its last submission is stored. A worker skips a submission that is no
longer the latest before doing any work, and claims the item (`claim`) just before writing it:
an older submission can then never overwrite a newer one that was stored first.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import redis

from visearch import redisconn
from visearch.errors import InvalidArgument, NotFound, ResourceExhausted

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
    # Items found to be the same picture as a stored one: item id -> (stored item id, skipped).
    duplicates: dict[str, tuple[str, bool]] = field(default_factory=dict)
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


JOB_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}", re.ASCII)


def check_job_id(job_id: str) -> str:
    """A job id names Redis keys: 1-64 ASCII letters and digits, nothing else (no ':')."""
    if not JOB_ID_RE.fullmatch(job_id or ""):
        raise InvalidArgument(f"job id {job_id[:80]!r} is invalid: 1-64 ASCII letters and digits")
    return job_id


def _keys(job_id: str) -> tuple[str, str, str, str]:
    base = PREFIX + job_id
    return base, base + ":items", base + ":done", base + ":failed"


def _seq_key(job_id: str) -> str:
    return PREFIX + job_id + ":seq"


def _claim_key(job_id: str, item_id: str) -> str:
    return f"{PREFIX}{job_id}:w:{item_id}"


# Finish items whose submission number is the latest (or given as ""): done or failed, bytes released.
# KEYS: base, done, failed, seq, then each item's blob key; ARGV: now, reason ("" = done), then item, seq pairs.
_FINISH = """
local n = 0
for i = 3, #ARGV, 2 do
  local item, seq = ARGV[i], ARGV[i + 1]
  local latest = redis.call('HGET', KEYS[4], item)
  if seq == '' or not latest or latest == seq then
    if ARGV[2] == '' then
      redis.call('SADD', KEYS[2], item)
      redis.call('HDEL', KEYS[3], item)
    else
      redis.call('HSET', KEYS[3], item, ARGV[2])
      redis.call('SREM', KEYS[2], item)
    end
    redis.call('DEL', KEYS[4 + (i - 1) / 2])
    n = n + 1
  end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
return n
"""
# Claim items for writing, all or nothing: per item 1 claimed, 0 stale (a newer submission exists),
# -1 busy (another task's claim); when any is busy nothing is claimed (no task holds part of a batch
# while it waits for the rest). A claim is "token|seq": one held for the *same* numbered submission
# (a copy of this batch: redelivered, or sent again by the ledger, whose holder may be a worker
# killed mid-write) is taken over, since both write the same rows; only another submission waits.
# KEYS: seq, then each item's claim key; ARGV: token, ttl ms, item, seq pairs.
_CLAIM = """
local out, busy = {}, false
for i = 3, #ARGV, 2 do
  local item, seq = ARGV[i], ARGV[i + 1]
  local latest = redis.call('HGET', KEYS[1], item)
  local holder = redis.call('GET', KEYS[1 + (i - 1) / 2])
  local held_seq = holder and string.match(holder, '|([^|]*)$')
  if seq ~= '' and latest and latest ~= seq then
    out[#out + 1] = 0
  elseif holder and holder ~= (ARGV[1] .. '|' .. seq) and not (seq ~= '' and held_seq == seq) then
    out[#out + 1] = -1
    busy = true
  else
    out[#out + 1] = 1
  end
end
if not busy then
  for i = 1, #out do
    if out[i] == 1 then redis.call('SET', KEYS[1 + i], ARGV[1] .. '|' .. ARGV[2 + 2 * i], 'PX', ARGV[2]) end
  end
end
return out
"""
# Open a job (or check an open one) atomically: its catalog and kind are set once and checked after.
# KEYS: base; ARGV: catalog, kind, now. Returns "" or the reason for refusing.
_OPEN = """
local c, k = unpack(redis.call('HMGET', KEYS[1], 'catalog', 'kind'))
if not c then
  redis.call('HSET', KEYS[1], 'catalog', ARGV[1], 'created_at', ARGV[3])
  if ARGV[2] ~= 'ingest' then redis.call('HSET', KEYS[1], 'kind', ARGV[2]) end
  return ''
end
if c ~= ARGV[1] then return 'catalog' end
if (k or 'ingest') ~= ARGV[2] then return k or 'ingest' end
return ''
"""
_RELEASE = """
local mine = ARGV[1] .. '|'
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, #mine) == mine then redis.call('DEL', KEYS[i]) end
end
return 0
"""


def blob_key(job_id: str, item_id: str) -> str:
    return f"vs:blob:{job_id}:{item_id}"


class Jobs:
    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.r = client
        self.ttl = ttl_seconds
        self._finish_script = client.register_script(_FINISH)
        self._claim_script = client.register_script(_CLAIM)
        self._open_script = client.register_script(_OPEN)
        self._release_script = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int) -> Jobs:
        return cls(redisconn.client(url), ttl_seconds)

    def submit(self, job_id: str, catalog: str, item_ids: list[str], blobs: dict[str, bytes],
               kind: str = "ingest") -> dict[str, int]:
        """Record items as pending (and stage inline bytes) before their tasks are queued; each item's
        submission number in this job (1 the first time), which its task carries. A job takes items
        of its own catalog and kind only (an ingest cannot add items to a re-embedding)."""
        base, items, done, failed = _keys(job_id)
        now = time.time()
        try:
            refused = self._open_script(keys=[base], args=[catalog, kind, now]).decode()
        except redis.exceptions.WrongTypeError:
            refused = "catalog"
        if refused == "catalog":
            raise InvalidArgument(f"job {job_id} belongs to another catalog than {catalog!r}")
        if refused:
            raise InvalidArgument(f"job {job_id} is a {refused} job, not an {kind} job")
        p = self.r.pipeline(transaction=True)
        seq = _seq_key(job_id)
        for item_id in item_ids:
            p.hincrby(seq, item_id, 1)
        self._index(p, job_id, now)
        p.hset(base, "updated_at", now)
        if item_ids:
            p.sadd(items, *item_ids)
            # A re-submitted item is pending again until this submission is processed.
            p.srem(done, *item_ids)
            p.hdel(failed, *item_ids)
            p.hdel(base + ":dups", *item_ids)  # and not a duplicate until this submission is checked
        for item_id, data in blobs.items():
            p.set(blob_key(job_id, item_id), data, ex=self.ttl)
        for k in (base, items, done, failed, seq):
            p.expire(k, self.ttl)
        try:
            res = p.execute()
        except redis.exceptions.ResponseError as exc:
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc) or "maxmemory" in str(exc):
                raise ResourceExhausted(f"the job store (Redis) is full ({exc}): retry later") from None
            raise
        return {item_id: int(n) for item_id, n in zip(item_ids, res, strict=False)}

    def check_room(self, nbytes: int, fraction: float = 0.75) -> None:
        """RESOURCE_EXHAUSTED unless `nbytes` more (image bytes and queued tasks) fit in Redis below
        `fraction` of its maxmemory, checked before anything is staged (nothing to check when Redis
        has no cap). Concurrent requests each check on their own: the margin above `fraction` is
        what they may overshoot by, and past maxmemory Redis refuses writes (noeviction) rather
        than dropping any."""
        info = self.r.info("memory")
        cap, used = int(info.get("maxmemory", 0) or 0), int(info.get("used_memory", 0) or 0)
        if cap and used + nbytes > fraction * cap:
            raise ResourceExhausted(f"the job store (Redis) holds {used >> 20} MiB of its {cap >> 20} MiB; "
                                    f"{nbytes >> 20} MiB more of image bytes do not fit now: retry later, or "
                                    "ingest by path")

    def latest(self, job_id: str, item_ids: list[str]) -> dict[str, int]:
        """Each item's latest submission number in the job (items never submitted are left out)."""
        if not item_ids:
            return {}
        vals = self.r.hmget(_seq_key(job_id), item_ids)
        return {i: int(v) for i, v in zip(item_ids, vals, strict=True) if v is not None}

    def claim(self, job_id: str, seqs: dict[str, int | None], token: str, ttl_ms: int = 60_000
              ) -> tuple[list[str], list[str], list[str]]:
        """Claim items for writing their submission `seqs[item]`: (claimed, stale, busy). Stale items
        have a newer submission (not to be written); busy ones are being written by another task's
        claim, and then nothing is claimed (all or nothing: ask again)."""
        if not seqs:
            return [], [], []
        ids = list(seqs)
        args = [token, ttl_ms]
        for i in ids:
            args += [i, "" if seqs[i] is None else str(seqs[i])]
        res = self._claim_script(keys=[_seq_key(job_id), *(_claim_key(job_id, i) for i in ids)], args=args)
        out: tuple[list[str], list[str], list[str]] = ([], [], [])
        for i, r in zip(ids, res, strict=True):
            out[0 if r == 1 else 1 if r == 0 else 2].append(i)
        if out[2]:
            out[0].clear()
        return out

    def release(self, job_id: str, item_ids: list[str], token: str) -> None:
        if item_ids:
            self._release_script(keys=[_claim_key(job_id, i) for i in item_ids], args=[token])

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

    def set_phase(self, job_id: str, phase: str, message: str = "", close: bool = False,
                  fields: dict[str, str] | None = None) -> None:
        """Move a job to `phase` (closed when `close`), recording `fields` of its own (read back by
        `field`) in the same write."""
        mapping = {**(fields or {}), "phase": phase, "message": message[:2000], "updated_at": time.time()}
        if close:
            mapping["open"] = 0
        self.r.hset(_keys(job_id)[0], mapping=mapping)

    def set_field(self, job_id: str, name: str, value: str) -> None:
        """Record one field of a job's own (read back by `field`)."""
        self.r.hset(_keys(job_id)[0], mapping={name: value, "updated_at": time.time()})

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

    def mark_done(self, job_id: str, item_ids: list[str], seqs: dict[str, int | None] | None = None) -> int:
        """Record items stored; with `seqs`, only those whose submission is still the latest. How many counted."""
        return self._finish(job_id, item_ids, None, seqs) if item_ids else 0

    def mark_failed(self, job_id: str, reasons: dict[str, str], seqs: dict[str, int | None] | None = None) -> int:
        return sum(self._finish(job_id, [item_id], reason, seqs) for item_id, reason in reasons.items())

    def _finish(self, job_id: str, item_ids: list[str], reason: str | None, seqs: dict | None) -> int:
        base, _, done, failed = _keys(job_id)
        args: list = [time.time(), "" if reason is None else (reason[:1000] or "failed")]
        for i in item_ids:
            s = (seqs or {}).get(i)
            args += [i, "" if s is None else str(s)]
        keys = [base, done, failed, _seq_key(job_id), *(blob_key(job_id, i) for i in item_ids)]
        return int(self._finish_script(keys=keys, args=args))

    def status(self, job_id: str, max_failures: int = 1000) -> JobStatus:
        base, items, done, failed = _keys(job_id)
        p = self.r.pipeline(transaction=True)
        p.hgetall(base)
        p.scard(items)
        p.scard(done)
        p.hlen(failed)
        if max_failures > 0:  # HSCAN ... COUNT 0 is a syntax error to Redis once the hash exists
            p.hscan(failed, 0, count=max_failures)
            p.hscan(base + ":dups", 0, count=max_failures)
        try:
            head, submitted, n_done, n_failed, *scan = p.execute()
        except redis.exceptions.ResponseError:  # a key of another type: not a job
            head = None
        if not head or b"catalog" not in head:
            raise NotFound(f"ingest job {job_id[:64]!r} does not exist (or has expired)")
        failures, dups = (scan[0][1], scan[1][1]) if scan else ({}, {})
        st = self._status(job_id, head, submitted, n_done, n_failed, failures, max_failures)
        for k, v in list(dups.items())[:max_failures]:
            skipped, _, of = v.decode().partition("|")
            st.duplicates[k.decode()] = (of, skipped == "1")
        return st

    def record_duplicates(self, job_id: str, found: dict[str, tuple[str, bool]]) -> None:
        """Note items found to be the same picture as a stored one: item -> (stored item, skipped)."""
        if found:
            key = _keys(job_id)[0] + ":dups"
            p = self.r.pipeline(transaction=True)
            p.hset(key, mapping={i: f"{int(skipped)}|{of}" for i, (of, skipped) in found.items()})
            p.expire(key, self.ttl)
            p.execute()

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

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in a Celery queue (a Redis list on the same Redis)."""
        return int(self.r.llen(queue))

    def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy (None when CONFIG is disabled, as on managed Redis)."""
        try:
            return self.r.config_get("maxmemory-policy").get("maxmemory-policy", "")
        except redis.exceptions.ResponseError:
            return None
