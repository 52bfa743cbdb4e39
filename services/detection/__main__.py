import asyncio

from services.detection.server import main
from visearch import log, tracing
from visearch.settings import DetectionSettings

settings = DetectionSettings()
log.configure("detection", settings.log_level, settings.log_json)
tracing.setup("detection", settings)  # off unless VISEARCH_OTLP_ENDPOINT is set
asyncio.run(main(settings))
