from services.console.server import main
from visearch import log
from visearch.settings import ConsoleSettings

settings = ConsoleSettings()
log.configure("console", settings.log_level, settings.log_json)
main(settings)
