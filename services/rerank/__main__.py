import asyncio

from services.rerank.server import main
from visearch import log, tracing
from visearch.settings import RerankSettings

settings = RerankSettings()
log.configure("rerank", settings.log_level, settings.log_json)
tracing.setup("rerank", settings)  # off unless VISEARCH_OTLP_ENDPOINT is set
asyncio.run(main(settings))
