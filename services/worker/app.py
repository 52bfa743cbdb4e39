"""The worker's Celery app, built from settings once: `celery -A services.worker.app worker`."""

from services.worker.tasks import register
from visearch import tracing
from visearch.queue import make_celery
from visearch.settings import WorkerSettings

settings = WorkerSettings()
app = make_celery(settings)
register(app, settings)
tracing.setup_worker("worker", settings)  # in each pool process, after the fork (off by default)
