"""Detection service: where the object is in each image.

Until the detector model lands (issue 4) it answers with no detections, which
every caller treats as "search with the full frame"; it still decodes each image,
so a bad image is refused here exactly as it will be with a real detector.
"""

from __future__ import annotations

from visearch import imaging
from visearch.detection.v1 import detection_pb2, detection_pb2_grpc
from visearch.errors import InvalidArgument
from visearch.grpcserver import Service, decode_bounded, rpc, serve
from visearch.settings import DetectionSettings

FULL_FRAME = "full-frame"


def _size(i: int, data: bytes) -> tuple[int, int]:
    """Width and height after EXIF orientation; the full decode also validates the bytes."""
    try:
        return imaging.decode_image(data).size
    except imaging.ImageError as exc:
        raise InvalidArgument(f"image {i}: {exc}") from None


class DetectionServicer(detection_pb2_grpc.DetectionServiceServicer):
    def __init__(self, decode_timeout: float = 10.0):
        self.decode_timeout = decode_timeout

    @rpc()
    async def Detect(self, request, context):
        if not request.images:
            raise InvalidArgument("no images to detect in")
        sizes = await decode_bounded(lambda: [_size(i, d) for i, d in enumerate(request.images)], self.decode_timeout)
        results = [detection_pb2.ImageDetections(width=w, height=h) for w, h in sizes]
        return detection_pb2.DetectResponse(results=results, model=FULL_FRAME)


async def main(settings: DetectionSettings, **kw) -> None:
    service = Service(detection_pb2.DESCRIPTOR.services_by_name["DetectionService"].full_name,
                      detection_pb2_grpc.add_DetectionServiceServicer_to_server,
                      DetectionServicer(settings.decode_timeout_seconds))

    async def ready() -> bool:
        return True  # no model to load yet

    await serve([service], settings, settings.detection_port, ready=ready, **kw)
