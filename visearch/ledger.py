"""A ledger of the queue's outstanding tasks, so that one the broker loses is queued again.

kombu's Redis transport takes a message with BRPOP and only then records it as unacknowledged
(MULTI ZADD unacked_index / HSET unacked): a message whose BRPOP reply a consumer drops (a
consumer restarting on a lost connection, a process killed between the two steps) exists nowhere
any more, neither in the queue nor among the unacknowledged ones, and the visibility timeout
cannot bring it back. It was seen in a kill -9 test of every component: one batch of 16 items
popped and never recorded, its job pending for ever (tests/test_reliability.py). The ledger closes
that gap one level up, with Celery's own signals:

- every task published (the gateway's batches, a worker's retries, re-embedding tasks) is
  recorded by its task id with what it needs to be sent again (`after_task_publish`);
- a worker starting it marks it alive (`task_prerun`), a task that succeeded is forgotten
  (`task_postrun`); a retry keeps the id and is published again, so it stays recorded;
- one worker at a time (`reconcile`, under a Redis lock) looks at the tasks not seen alive for
  `lost_after` seconds and reads one consistent snapshot of the queue and of the unacknowledged
  messages: a task in neither is sent again with the same id and arguments, with a warning.

A batch sent again twice (a snapshot taken in the microseconds between BRPOP and its record) runs
twice: ingestion is idempotent per item id and the job counts only its latest submission, so that
costs time, never data. Entries older than the jobs' TTL are dropped (their staged bytes are gone).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis

from visearch import redisconn

log = logging.getLogger(__name__)

LEDGER = "vs:ledger"  # hash: task id -> JSON {"name", "args", "kwargs", "queue"}
FIRST = "vs:ledger:first"  # hash: task id -> when it was first published (a copy sent again keeps it)
SEEN = "vs:ledger:seen"  # sorted set: task id -> the last time it was known alive (published, started, found)
LOCK = "vs:ledger:lock"
KOMBU_UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)

_tracked: dict = {"names": frozenset(), "url": None, "client": None, "pid": None}


def _client() -> redis.Redis | None:
    if not _tracked["url"]:
        return None
    if _tracked["client"] is None or _tracked["pid"] != os.getpid():  # a forked pool child: its own socket
        _tracked["client"] = redisconn.client(_tracked["url"])
        _tracked["pid"] = os.getpid()
    return _tracked["client"]


def record(r: redis.Redis, task_id: str, name: str, args, kwargs, queue: str, now: float | None = None) -> None:
    now = time.time() if now is None else now
    entry = json.dumps({"name": name, "args": args, "kwargs": kwargs or {}, "queue": queue})
    p = r.pipeline(transaction=True)  # one round trip: the first publication's time is kept by HSETNX
    p.hset(LEDGER, task_id, entry)
    p.hsetnx(FIRST, task_id, repr(now))
    p.zadd(SEEN, {task_id: now})
    p.execute()


def forget(r: redis.Redis, task_id: str) -> None:
    p = r.pipeline(transaction=True)
    p.hdel(LEDGER, task_id)
    p.hdel(FIRST, task_id)
    p.zrem(SEEN, task_id)
    p.execute()


def alive(r: redis.Redis, task_id: str, now: float | None = None) -> None:
    r.zadd(SEEN, {task_id: time.time() if now is None else now}, xx=True)


def _on_publish(sender=None, body=None, headers=None, routing_key=None, **_):
    if sender not in _tracked["names"] or not headers or not headers.get("id"):
        return
    try:
        args, kwargs = (body[0], body[1]) if isinstance(body, (list, tuple)) else ([], {})
        record(_client(), headers["id"], sender, list(args), dict(kwargs), routing_key or "")
    except Exception as exc:  # noqa: BLE001 - the message is published; only its safety net is missing
        log.warning("task %s not recorded in the ledger: %s", headers.get("id"), exc)


def _on_prerun(task_id=None, task=None, **_):
    if task is None or task.name not in _tracked["names"]:
        return
    try:
        alive(_client(), task_id)
    except Exception:  # noqa: BLE001 - best effort: a missed mark costs at most one needless snapshot
        pass


def _on_postrun(task_id=None, task=None, state=None, **_):
    # Only a success ends a task: a retry is published again under its id, a task that raised
    # stays unacknowledged (task_acks_on_failure_or_timeout=False) and comes back.
    if task is None or task.name not in _tracked["names"] or state != "SUCCESS":
        return
    try:
        forget(_client(), task_id)
    except Exception as exc:  # noqa: BLE001 - left over, the next snapshot finds it gone and runs it again (idempotent)
        log.warning("task %s not taken off the ledger: %s", task_id, exc)


def track(broker_url: str, names) -> None:
    """Record the tasks named `names` that this process publishes, starts and finishes."""
    from celery.signals import after_task_publish, task_postrun, task_prerun

    _tracked["names"] = frozenset(_tracked["names"] | set(names))
    _tracked["url"] = broker_url
    after_task_publish.connect(_on_publish, weak=False, dispatch_uid="visearch.ledger.publish")
    task_prerun.connect(_on_prerun, weak=False, dispatch_uid="visearch.ledger.prerun")
    task_postrun.connect(_on_postrun, weak=False, dispatch_uid="visearch.ledger.postrun")


def in_flight(r: redis.Redis, queues) -> set[str]:
    """Task ids in the queues (every kombu priority list) or unacknowledged, from one snapshot."""
    keys = [q if pri == 0 else f"{q}{KOMBU_PRIORITY_SEP}{pri}" for q in queues for pri in KOMBU_PRIORITY_STEPS]
    p = r.pipeline(transaction=True)  # MULTI: the lists and the hash as of one instant
    for k in keys:
        p.lrange(k, 0, -1)
    p.hvals(KOMBU_UNACKED)
    *lists, unacked = p.execute()
    ids = set()
    for raw in (m for lst in lists for m in lst):
        try:
            ids.add(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            continue
    for raw in unacked:
        try:
            ids.add(json.loads(raw)[0]["headers"]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


def reconcile(r: redis.Redis, app, lost_after: float, ttl: float, now: float | None = None, limit: int = 1000
              ) -> list[str]:
    """Send again every recorded task not seen alive for `lost_after` s and in no queue or
    unacknowledged; the ids sent again."""
    now = time.time() if now is None else now
    stale = [t.decode() for t in r.zrangebyscore(SEEN, "-inf", now - lost_after, start=0, num=limit)]
    if not stale:
        return []
    entries = dict(zip(stale, r.hmget(LEDGER, stale), strict=True))
    firsts = dict(zip(stale, r.hmget(FIRST, stale), strict=True))
    queues = {json.loads(e)["queue"] for e in entries.values() if e} or {app.conf.task_default_queue}
    flying = in_flight(r, queues)
    if flying:  # every recorded task found is alive now: the next snapshot waits `lost_after` again
        r.zadd(SEEN, dict.fromkeys(flying, now), xx=True)
    sent = []
    for task_id, raw in entries.items():
        if raw is None:
            r.zrem(SEEN, task_id)
            continue
        entry = json.loads(raw)
        first = entry.get("first") or float(firsts[task_id] or now)  # "first" in the entry: recorded before FIRST
        if now - first > ttl:
            forget(r, task_id)
            log.warning("task %s dropped from the ledger: older than the jobs' TTL", task_id)
            continue
        if task_id in flying:
            continue
        log.warning("task %s (%s) is in no queue and unacknowledged by no worker: the broker lost it; "
                    "sent again", task_id, entry["name"])
        app.send_task(entry["name"], args=entry["args"], kwargs=entry["kwargs"], task_id=task_id,
                      queue=entry["queue"] or None)
        sent.append(task_id)
    return sent


def run_reconciler(url: str, app, lost_after: float, ttl: float, every: float, stop: threading.Event) -> None:
    """`reconcile` every `every` s while `stop` is not set, by one process at a time (a lock in Redis)."""
    r = redisconn.client(url, socket_timeout=10)
    token = f"{os.getpid()}-{time.time()}"
    while not stop.wait(every):
        try:
            if r.set(LOCK, token, nx=True, ex=max(1, int(every * 3))) or r.get(LOCK) == token.encode():
                r.expire(LOCK, max(1, int(every * 3)))
                reconcile(r, app, lost_after, ttl)
        except redis.exceptions.RedisError as exc:  # Redis away: the next round tries again
            log.info("ledger not reconciled: %s", exc)
        except Exception:  # noqa: BLE001 - never kill the worker's main process
            log.exception("ledger reconcile failed")


def start_reconciler(url: str, app, lost_after: float, ttl: float, every: float) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=run_reconciler, args=(url, app, lost_after, ttl, every, stop), name="ledger",
                     daemon=True).start()
    return stop
