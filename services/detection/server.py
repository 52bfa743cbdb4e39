"""Detection service: where the objects of interest are in each image.

The `detector` model of the repository (SSD-MobileNetV2: the COCO conversion, or the
class-agnostic model fine-tuned on composited scenes) runs behind the same inference
backend as the embedder. Images are decoded with EXIF orientation applied, so boxes are
in pixels of the image as a person sees it; an image with no box above the threshold
gets an empty list and callers fall back to the full frame.
"""

from __future__ import annotations

from visearch import detector as det
from visearch.common.v1 import common_pb2
from visearch.detection.v1 import detection_pb2, detection_pb2_grpc
from visearch.detection_model import DetectionModel
from visearch.errors import InvalidArgument
from visearch.grpcserver import Service, rpc, serve
from visearch.inference import make_backend
from visearch.settings import DetectionSettings


def detections_pb(boxes: list[det.Box]) -> list[detection_pb2.Detection]:
    return [detection_pb2.Detection(box=common_pb2.BoundingBox(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2), score=b.score,
                                    label=b.label) for b in boxes]


class DetectionServicer(detection_pb2_grpc.DetectionServiceServicer):
    def __init__(self, model: DetectionModel):
        self.model = model

    @rpc()
    async def Detect(self, request, context):
        if not request.images:
            raise InvalidArgument("no images to detect in")
        if request.min_score < 0 or request.max_detections < 0:
            raise InvalidArgument("min_score and max_detections must not be negative")
        sizes, found = await self.model.detect(list(request.images), min_score=request.min_score,
                                               max_detections=request.max_detections)
        results = [detection_pb2.ImageDetections(width=w, height=h, detections=detections_pb(boxes))
                   for (w, h), boxes in zip(sizes, found, strict=True)]
        return detection_pb2.DetectResponse(results=results, model=await self.model.tag())


async def main(settings: DetectionSettings, **kw) -> None:
    backend = make_backend(settings)
    model = DetectionModel(backend, settings)
    service = Service(detection_pb2.DESCRIPTOR.services_by_name["DetectionService"].full_name,
                      detection_pb2_grpc.add_DetectionServiceServicer_to_server, DetectionServicer(model))
    await serve([service], settings, settings.detection_port, ready=model.ready, on_stop=backend.close, **kw)
