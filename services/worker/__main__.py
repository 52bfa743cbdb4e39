"""Run one Celery ingestion worker: `python -m services.worker`."""

import os

from services.worker.app import app, settings
from visearch import log

log.configure("worker", settings.log_level, settings.log_json)
app.worker_main(["worker", "--loglevel", settings.log_level, "--concurrency", str(settings.worker_concurrency),
                 "--queues", "visearch.ingest", "--hostname", f"worker{os.getpid()}@%h", "--without-gossip", "--without-mingle"])
