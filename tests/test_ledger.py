"""The ledger (visearch/ledger.py) on a real Redis with real Celery publishing: a task the broker
lost (taken off its queue and never recorded as unacknowledged, kombu's BRPOP window) is sent again
with its id and arguments; one still queued or unacknowledged, or finished, is not."""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace

import pytest
import redis

from visearch import ledger
from visearch.queue import INGEST_QUEUE, INGEST_TASK, make_celery
from visearch.settings import QueueSettings


@pytest.fixture()
def env(redis_url):
    r = redis.Redis.from_url(redis_url)
    keys = (ledger.LEDGER, ledger.FIRST, ledger.SEEN, ledger.KOMBU_UNACKED, INGEST_QUEUE)
    r.delete(*keys)
    app = make_celery(QueueSettings(redis_url=redis_url))
    yield r, app
    r.delete(*keys)


def queued(r) -> dict[str, list]:
    return {json.loads(m)["headers"]["id"]: json.loads(m) for m in r.lrange(INGEST_QUEUE, 0, -1)}


def test_a_lost_task_is_sent_again_and_only_that_one(env):
    r, app = env
    lost = app.send_task(INGEST_TASK, args=["job1", "cat", [{"item_id": "a", "seq": 1}]]).id
    waiting = app.send_task(INGEST_TASK, args=["job1", "cat", [{"item_id": "b", "seq": 1}]]).id
    running = app.send_task(INGEST_TASK, args=["job1", "cat", [{"item_id": "c", "seq": 1}]]).id
    done = app.send_task(INGEST_TASK, args=["job1", "cat", [{"item_id": "d", "seq": 1}]]).id
    assert set(r.hkeys(ledger.LEDGER)) == {t.encode() for t in (lost, waiting, running, done)}
    msgs = queued(r)
    # What kombu's consumer does: BRPOP, then record the message as unacknowledged. For `lost` the
    # second step never happens (the reply dropped); `running` is recorded; `done` ran and succeeded.
    r.lrem(INGEST_QUEUE, 1, json.dumps(msgs[lost]))
    r.lrem(INGEST_QUEUE, 1, json.dumps(msgs[running]))
    r.hset(ledger.KOMBU_UNACKED, "tag-running", json.dumps([msgs[running], "", INGEST_QUEUE]))
    r.lrem(INGEST_QUEUE, 1, json.dumps(msgs[done]))
    ledger._on_postrun(task_id=done, task=SimpleNamespace(name=INGEST_TASK), state="SUCCESS")
    assert set(queued(r)) == {waiting}

    assert ledger.reconcile(r, app, lost_after=60, ttl=3600) == [], "nothing is stale yet"
    later = time.time() + 61
    first = r.hget(ledger.FIRST, lost)
    assert ledger.reconcile(r, app, lost_after=60, ttl=3600, now=later) == [lost]
    assert r.hget(ledger.FIRST, lost) == first, "a copy sent again keeps the first publication's time"
    again = queued(r)
    assert set(again) == {waiting, lost}
    assert again[lost]["headers"]["task"] == INGEST_TASK
    body = json.loads(base64.b64decode(again[lost]["body"]))
    assert body[0] == ["job1", "cat", [{"item_id": "a", "seq": 1}]], "the same arguments"
    # The ones found were marked alive: the next round right after sends nothing.
    assert ledger.reconcile(r, app, lost_after=60, ttl=3600, now=later + 1) == []
    # A retry keeps its id and stays recorded; a task started is marked alive.
    ledger._on_prerun(task_id=running, task=SimpleNamespace(name=INGEST_TASK))
    assert r.zscore(ledger.SEEN, running) > later - 61


def test_entries_older_than_the_jobs_ttl_are_dropped(env):
    r, app = env
    tid = app.send_task(INGEST_TASK, args=["job2", "cat", []]).id
    r.delete(INGEST_QUEUE)
    assert ledger.reconcile(r, app, lost_after=60, ttl=30, now=time.time() + 61) == []
    assert not r.hexists(ledger.LEDGER, tid) and r.zscore(ledger.SEEN, tid) is None
    assert not r.hexists(ledger.FIRST, tid)
    assert r.llen(INGEST_QUEUE) == 0
