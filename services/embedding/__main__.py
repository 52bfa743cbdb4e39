import asyncio

from services.embedding.server import main
from visearch import log
from visearch.settings import EmbeddingSettings

settings = EmbeddingSettings()
log.configure("embedding", settings.log_level, settings.log_json)
asyncio.run(main(settings))
