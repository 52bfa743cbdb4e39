"""Job bookkeeping on a real Redis: counts add up however often work is repeated."""

from __future__ import annotations

import pytest

from visearch.errors import InvalidArgument, NotFound
from visearch.jobs import Jobs, new_job_id


@pytest.fixture
def jobs(redis_url):
    return Jobs.from_url(redis_url, ttl_seconds=60)


def test_counts_add_up_and_repeat_is_harmless(jobs):
    job = new_job_id()
    jobs.submit(job, "cat", ["a", "b", "c", "d"], {"a": b"bytes-a"})
    st = jobs.status(job)
    assert (st.submitted, st.done, st.failed, st.pending) == (4, 0, 0, 4)
    assert jobs.blob(job, "a") == b"bytes-a"
    assert jobs.blobs(job, ["b", "a"]) == [None, b"bytes-a"] and jobs.blobs(job, []) == []
    jobs.mark_done(job, ["a", "b"])
    jobs.mark_done(job, ["a", "b"])  # a task re-run after a worker died
    jobs.mark_failed(job, {"c": "not an image"})
    st = jobs.status(job)
    assert (st.submitted, st.done, st.failed, st.pending) == (4, 2, 1, 1)
    assert st.failures == {"c": "not an image"}
    assert jobs.blob(job, "a") is None, "processed bytes are released"
    # Re-submitting an item (even a failed one) makes it pending again, counted once.
    jobs.submit(job, "cat", ["c", "d"], {})
    st = jobs.status(job)
    assert (st.submitted, st.done, st.failed, st.pending) == (4, 2, 0, 2)
    jobs.mark_done(job, ["c", "d"])
    assert jobs.status(job).finished


def test_unknown_job_and_wrong_catalog(jobs):
    with pytest.raises(NotFound):
        jobs.status("nosuchjob")
    job = new_job_id()
    jobs.submit(job, "one", ["x"], {})
    with pytest.raises(InvalidArgument, match="another catalog") as err:
        jobs.submit(job, "two", ["y"], {})
    assert "one" not in str(err.value), "the other catalog is not named"


def test_redelivered_batch_counts_stored_items_as_done(jobs):
    """A batch delivered again after its items were stored (worker killed before the ack, or the
    visibility timeout passed) finds their bytes released: they stay done, never turn failed."""
    from types import SimpleNamespace

    from services.worker.pipeline import process

    job = new_job_id()
    jobs.submit(job, "cat", ["a", "b"], {"a": b"bytes-a", "b": b"bytes-b"})
    jobs.mark_done(job, ["a", "b"])  # the first delivery stored them and released the bytes
    ctx = SimpleNamespace(jobs=jobs, settings=SimpleNamespace(rpc_timeout_seconds=5))
    done, failed = process(ctx, job, "cat", [{"item_id": "a"}, {"item_id": "b"}])
    assert sorted(done) == ["a", "b"] and failed == {}
    jobs.submit(job, "cat", ["c"], {})  # never had bytes and is not done: a real failure
    done, failed = process(ctx, job, "cat", [{"item_id": "c"}])
    assert done == [] and "missing" in failed["c"]


def test_counts_only_status_of_a_job_with_failures(jobs):
    """The workers ask for counts only (max_failures=0); a job with failures once made Redis answer a
    syntax error there (HSCAN COUNT 0), which failed the batch after its items were recorded."""
    job = new_job_id()
    jobs.submit(job, "cat", ["a", "b"], {})
    jobs.mark_done(job, ["a"])
    jobs.mark_failed(job, {"b": "corrupt"})
    st = jobs.status(job, max_failures=0)
    assert (st.done, st.failed, st.failures, st.finished) == (1, 1, {}, True)


def test_open_jobs_and_the_newest_first_listing(jobs):
    """A re-embedding job stays unfinished until closed, whatever its counts; jobs are listed newest first."""
    first, second = new_job_id(), new_job_id()
    jobs.submit(first, "a", ["x"], {})
    jobs.create(second, "b", "reembed", "planning", generation=2)
    assert not jobs.status(second).finished, "open: nothing planned yet is not done"
    with pytest.raises(InvalidArgument, match="reembed job"):
        jobs.submit(second, "b", ["y"], {})  # an ingest request cannot add items to a re-embedding
    jobs.submit(second, "b", ["y"], {}, kind="reembed")
    jobs.mark_done(second, ["y"])
    assert not jobs.status(second).finished
    jobs.set_phase(second, "switched", "done", close=True)
    st = jobs.status(second)
    assert (st.finished, st.kind, st.phase, st.message) == (True, "reembed", "switched", "done")
    listed = [s.job_id for s in jobs.recent(50)]
    assert listed.index(second) < listed.index(first)
    only_a = jobs.recent(50, lambda c: c == "a")
    assert first in [s.job_id for s in only_a] and all(s.catalog == "a" for s in only_a)


def test_a_refused_batch_goes_unit_by_unit_and_a_lost_dependency_retries_it(jobs):
    """The worker's run_batch: a final answer for a batch (one image the services cannot decode)
    retries it unit by unit, so that image fails alone with the reason; a dependency lost during
    that pass retries the whole batch instead of leaving units neither done nor failed.
    (The faults are stand-ins: a service refusing one image of a batch, then going away.)"""
    from types import SimpleNamespace

    import grpc

    from services.worker.pipeline import Transient, run_batch

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "image 0: image could not be decoded (truncated or corrupt)"

    class Retry(Exception):
        pass

    class Task:
        max_retries = 3
        request = SimpleNamespace(retries=0, headers={}, request_id=None)

        def retry(self, exc, countdown):
            return Retry(exc)

    ctx = SimpleNamespace(jobs=jobs)
    job = new_job_id()
    jobs.submit(job, "cat", ["a", "b", "c"], {})

    def refuses_b(units):
        if len(units) > 1 or units[0] == "b":
            raise Refused()
        return [units[0]], {}

    done, failed = run_batch(Task(), ctx, job, ["a", "b", "c"], refuses_b, lambda u: u)
    assert done == ["a", "c"] and failed == {"b": "INVALID_ARGUMENT: image 0: image could not be decoded (truncated or corrupt)"}
    st = jobs.status(job)
    assert (st.done, st.failed, st.pending) == (2, 1, 0)

    job2 = new_job_id()
    jobs.submit(job2, "cat", ["a", "b"], {})

    def goes_away(units):
        if len(units) > 1:
            raise Refused()
        raise Transient("embedding service: UNAVAILABLE")

    with pytest.raises(Retry):
        run_batch(Task(), ctx, job2, ["a", "b"], goes_away, lambda u: u)
    assert jobs.status(job2).pending == 2, "nothing recorded: the retried batch decides"


def test_only_the_latest_submission_of_an_item_counts(jobs):
    """A job that submits the same items in several requests: each submission has its number, an
    earlier one finishing late changes nothing, and the item is pending until its last submission
    is stored (the defect: DONE 100/100 after the first of five rounds)."""
    job = new_job_id()
    rounds = [jobs.submit(job, "cat", ["a", "b"], {"a": f"round{n}".encode()}) for n in range(1, 6)]
    assert [r["a"] for r in rounds] == [1, 2, 3, 4, 5] and jobs.latest(job, ["a", "b", "zz"]) == {"a": 5, "b": 5}
    assert jobs.blob(job, "a") == b"round5", "the latest bytes are staged"
    for n in range(1, 5):  # the first four rounds' tasks finish: none of them counts
        assert jobs.mark_done(job, ["a", "b"], {"a": n, "b": n}) == 0
        assert jobs.mark_failed(job, {"a": "late"}, {"a": n}) == 0
    st = jobs.status(job)
    assert (st.submitted, st.done, st.failed, st.pending) == (2, 0, 0, 2)
    assert jobs.blob(job, "a") == b"round5", "a superseded task leaves the latest bytes alone"
    assert jobs.mark_done(job, ["a", "b"], {"a": 5, "b": 5}) == 2
    st = jobs.status(job)
    assert (st.done, st.pending, st.finished) == (2, 0, True) and jobs.blob(job, "a") is None
    # A task without numbers (queued by an older gateway, or a re-embedding's) counts as before.
    jobs.submit(job, "cat", ["c"], {})
    assert jobs.mark_done(job, ["c"]) == 1 and jobs.status(job).finished


def test_claims_order_the_writes_of_one_item(jobs):
    """Just before writing, a task claims its items: a superseded submission is told to drop them,
    and while one task writes an item another task's claim on it waits."""
    job = new_job_id()
    jobs.submit(job, "cat", ["a", "b"], {})
    assert jobs.claim(job, {"a": 1, "b": 1}, "t1") == (["a", "b"], [], [])
    assert jobs.claim(job, {"a": 1, "b": 1}, "t1") == (["a", "b"], [], []), "a claim is re-entrant for its holder"
    jobs.submit(job, "cat", ["a"], {})  # a second request of the job submits "a" again
    assert jobs.claim(job, {"a": 2}, "t2") == ([], [], ["a"]), "t1 is still writing a"
    jobs.release(job, ["a", "b"], "t1")
    assert jobs.claim(job, {"a": 2}, "t2") == (["a"], [], [])
    jobs.release(job, ["a"], "t2")
    assert jobs.claim(job, {"a": 1}, "t3") == ([], ["a"], []), "submission 1 of a is superseded"
    jobs.release(job, ["a"], "t-other")  # someone else's release frees nothing
    assert jobs.claim(job, {"b": 1}, "t4") == (["b"], [], [])
    # A copy of the same submission (redelivered, or sent again by the ledger, its first holder
    # perhaps killed mid-write) takes the claim over: both write the same rows. Only the new holder's
    # release frees it; an unnumbered claim still waits.
    assert jobs.claim(job, {"b": 1}, "t5") == (["b"], [], [])
    jobs.release(job, ["b"], "t4")
    assert jobs.claim(job, {"b": None}, "t6") == ([], [], ["b"])
    jobs.release(job, ["b"], "t5")
    assert jobs.claim(job, {"b": None}, "t6") == (["b"], [], [])
    assert jobs.claim(job, {"b": 1}, "t7") == ([], [], ["b"]), "an unnumbered holder is not taken over"


def test_a_superseded_submission_is_not_worked_on(jobs):
    """The worker drops a task's items whose submission a later request superseded, before reading
    or embedding them (the later task stores and counts them)."""
    from types import SimpleNamespace

    from services.worker.pipeline import process

    job = new_job_id()
    jobs.submit(job, "cat", ["a"], {"a": b"not read"})
    jobs.submit(job, "cat", ["a"], {"a": b"not read either"})
    ctx = SimpleNamespace(jobs=jobs, settings=SimpleNamespace(rpc_timeout_seconds=5))
    assert process(ctx, job, "cat", [{"item_id": "a", "seq": 1}]) == ([], {})


def test_a_full_redis_refuses_staging_and_never_evicts(redis_url):
    """Image bytes that would fill Redis are refused before anything is staged (RESOURCE_EXHAUSTED),
    and a Redis at its cap under noeviction refuses writes instead of dropping the queue."""
    import redis

    from visearch.errors import ResourceExhausted

    r = redis.Redis.from_url(redis_url)
    jobs = Jobs(r, 60)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 8 * 1024 * 1024)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    try:
        jobs.check_room(1024)
        with pytest.raises(ResourceExhausted, match="do not fit"):
            jobs.check_room(16 * 1024 * 1024)
        r.lpush("vs:test:queue", "task")
        job = new_job_id()
        with pytest.raises(ResourceExhausted, match="full"):
            for n in range(64):
                jobs.submit(job, "cat", [f"i{n}"], {f"i{n}": b"x" * 1024 * 1024})
        assert r.lrange("vs:test:queue", 0, -1) == [b"task"], "nothing evicted"
    finally:
        r.delete("vs:test:queue")
        for k in r.scan_iter("vs:blob:*"):
            r.delete(k)
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", policy)
