import asyncio

from services.embedding.server import main
from visearch import log, tracing
from visearch.settings import EmbeddingSettings

settings = EmbeddingSettings()
log.configure("embedding", settings.log_level, settings.log_json)
tracing.setup("embedding", settings)  # off unless VISEARCH_OTLP_ENDPOINT is set
asyncio.run(main(settings))
