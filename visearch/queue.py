"""The Celery application shared by the gateway (which enqueues) and the workers."""

from __future__ import annotations

from celery import Celery

from visearch import ledger, redisconn
from visearch.settings import QueueSettings

INGEST_TASK = "visearch.ingest_batch"
# Re-embedding a catalog into a new generation (services/worker/reembed.py).
REEMBED_PLAN_TASK = "visearch.reembed_plan"
REEMBED_BATCH_TASK = "visearch.reembed_batch"
RETIRE_TASK = "visearch.retire_generation"
# Adapting a catalog's descriptor, then re-embedding it (services/worker/adapt.py).
ADAPT_TASK = "visearch.adapt_catalog"
INGEST_QUEUE = "visearch.ingest"


def make_celery(settings: QueueSettings) -> Celery:
    broker, backend, sentinel = redisconn.celery_urls(settings.redis_url)
    app = Celery("visearch", broker=broker, backend=backend)
    app.conf.update(
        # JSON only: a pickle message on a shared broker is remote code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # At-least-once: a task is acknowledged after it ran, and a worker that dies
        # mid-task gives it back; idempotent upserts make the re-run harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raises (Redis or Milvus down while recording) stays unacknowledged
        # and comes back after the visibility timeout; item-level errors never raise.
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu restores unacked messages of dead workers only every ~100 s by default.
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # The restore's lock in Redis: one left behind by a Redis killed mid-restore (the
            # append-only file keeps it) would hold every restore back for kombu's 5 minutes.
            "unacked_mutex_expire": 30,
            **sentinel,  # Redis Sentinel: the master's name (visearch/redisconn.py)
        },
        result_backend_transport_options=dict(sentinel),
        task_default_queue=INGEST_QUEUE,
        task_routes={name: {"queue": INGEST_QUEUE}
                     for name in (INGEST_TASK, REEMBED_PLAN_TASK, REEMBED_BATCH_TASK, RETIRE_TASK)},
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    # Every task this process publishes, starts or finishes is kept in the ledger, so a message the
    # broker loses is sent again (visearch/ledger.py).
    ledger.track(settings.redis_url, (INGEST_TASK, REEMBED_PLAN_TASK, REEMBED_BATCH_TASK, RETIRE_TASK, ADAPT_TASK))
    return app
