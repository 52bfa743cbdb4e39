"""The worker's Celery app, built from settings once: `celery -A services.worker.app worker`.

Its tasks are in the modules of `include`, imported by the worker when it starts: ingestion
(services/worker/ingest.py), re-embedding (services/worker/reembed.py) and catalog adaptation
(services/worker/adapt.py); they run the steps of
services/worker/pipeline.py. Those modules import this one, never the reverse."""

import logging

from celery.signals import worker_process_init, worker_ready

from visearch import ledger, tracing
from visearch import observability as obs
from visearch.queue import make_celery
from visearch.settings import WorkerSettings

log = logging.getLogger(__name__)
TASK_MODULES = ["services.worker.ingest", "services.worker.reembed", "services.worker.adapt"]

settings = WorkerSettings()
app = make_celery(settings)
app.conf.include = TASK_MODULES


@worker_ready.connect(weak=False)
def _reconciler(**_):
    # In the worker's main process: tasks the broker lost are sent again (visearch/ledger.py).
    ledger.start_reconciler(settings.redis_url, app, settings.lost_task_after_seconds,
                            settings.job_ttl_seconds, settings.ledger_every_seconds)


@worker_process_init.connect(weak=False)
def _metrics(**_):
    # Each pool child serves its own /metrics: worker_metrics_port + the child's index.
    if settings.worker_metrics_port:
        from billiard.process import current_process

        port = settings.worker_metrics_port + (getattr(current_process(), "index", 0) or 0)
        try:
            obs.serve_metrics(port, settings.host)
        except OSError as exc:  # the port is taken: this child works on without a /metrics
            log.warning("worker /metrics not served on port %s: %s", port, exc)


tracing.setup_worker("worker", settings)  # in each pool process, after the fork (off by default)
