import asyncio

from services.detection.server import main
from visearch import log
from visearch.settings import DetectionSettings

settings = DetectionSettings()
log.configure("detection", settings.log_level, settings.log_json)
asyncio.run(main(settings))
