import asyncio

from services.rerank.server import main
from visearch import log
from visearch.settings import RerankSettings

settings = RerankSettings()
log.configure("rerank", settings.log_level, settings.log_json)
asyncio.run(main(settings))
