import asyncio

from services.gateway.server import main
from visearch import log
from visearch.settings import GatewaySettings

settings = GatewaySettings()
log.configure("gateway", settings.log_level, settings.log_json)
asyncio.run(main(settings))
