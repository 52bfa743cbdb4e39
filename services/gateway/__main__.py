import asyncio

from services.gateway.server import main
from visearch import log, tracing
from visearch.settings import GatewaySettings

settings = GatewaySettings()
log.configure("gateway", settings.log_level, settings.log_json)
tracing.setup("gateway", settings)  # off unless VISEARCH_OTLP_ENDPOINT is set
asyncio.run(main(settings))
