"""The detection model as the detection service runs it: decode (EXIF orientation applied, large JPEGs
at a reduced scale), batch, detect. The gRPC servicer (services/detection/server.py), `visearch detect`
and the benchmarks share it; boxes are in pixels of the original image."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from visearch import detector as det
from visearch import imaging
from visearch.errors import InvalidArgument, VisearchError
from visearch.grpcserver import decode_bounded
from visearch.inference import InferenceBackend, OnnxRuntimeBackend, WarmUp
from visearch.settings import DetectionSettings

log = logging.getLogger(__name__)
MAX_DETECTIONS = 100


class DetectionModel:
    """Decode, batch and detect; the gRPC servicer and the CLI share it."""

    def __init__(self, backend: InferenceBackend, settings: DetectionSettings):
        self.backend = backend
        self.settings = settings
        self.detector = det.Detector(backend, resize=settings.detector_resize)
        self._warm_up = WarmUp(self._warm)

    async def ready(self) -> bool:
        if not await self.backend.ready(det.MODEL):
            return False
        await self._warm_up()
        return True

    async def _warm(self) -> None:
        meta = await self.detector.meta()
        t0 = time.perf_counter()
        blank = np.zeros((1, meta.input_size, meta.input_size, 3), np.uint8)
        await asyncio.gather(*(self.backend.infer(det.MODEL, {meta.input_name: blank}, ["boxes", "scores"])
                               for _ in range(self.backend.parallel_runs)))
        log.info("model warmed up", extra={"model": meta.tag, "ms": round((time.perf_counter() - t0) * 1000, 1)})

    async def detect_images(self, images, *, min_score: float = 0.0, max_detections: int = 0,
                            sizes: list[tuple[int, int]] | None = None) -> list[list[det.Box]]:
        s = self.settings
        min_score = min_score or s.detector_min_score
        limit = max_detections or s.detector_max_detections
        if not 0.0 < min_score <= 1.0:
            raise InvalidArgument(f"min_score {min_score} is outside (0, 1]")
        if not 0 < limit <= MAX_DETECTIONS:
            raise InvalidArgument(f"max_detections {limit} is outside 1..{MAX_DETECTIONS}")
        meta = await self.detector.meta()
        batch = min(s.max_batch, int(meta.extra.get("max_batch_size") or s.max_batch))
        sizes = sizes or [img.size for img in images]
        out: list[list[det.Box]] = []
        for start in range(0, len(images), batch):
            out += await self.detector.detect(images[start:start + batch], min_score=min_score, iou=s.detector_iou,
                                              limit=limit, per_class=s.detector_per_class,
                                              sizes=sizes[start:start + batch])
        return out

    async def detect(self, blobs: list[bytes], *, min_score: float = 0.0, max_detections: int = 0
                     ) -> tuple[list[tuple[int, int]], list[list[det.Box]]]:
        # A large JPEG decodes at a reduced scale (still twice the detector's input on both
        # sides); boxes come back in pixels of the original image all the same.
        draft = 2 * (await self.detector.meta()).input_size

        def decode(i: int, data: bytes):
            try:
                img, scale = imaging.decode_image_scaled(data, draft_size=draft)
                return img, (imaging.image_size(data) if scale != 1.0 else img.size)
            except imaging.ImageError as exc:
                raise InvalidArgument(f"image {i}: {exc}") from None

        decoded = await decode_bounded(lambda: [decode(i, d) for i, d in enumerate(blobs)], self.settings.decode_timeout_seconds)
        images, sizes = [d[0] for d in decoded], [d[1] for d in decoded]
        found = await self.detect_images(images, min_score=min_score, max_detections=max_detections, sizes=sizes)
        return sizes, found

    async def tag(self) -> str:
        return (await self.detector.meta()).tag


def run_local(model_cls, settings: DetectionSettings, paths, min_score: float = 0.0, max_detections: int = 0):
    """Detect in image files in this process (ONNX Runtime), one at a time: (path, boxes or error text)."""

    async def run():
        versions = {det.MODEL: settings.detector_version} if settings.detector_version else {}
        backend = OnnxRuntimeBackend(settings.model_repository, versions, settings.ort_intra_op_threads)
        model = model_cls(backend, settings)
        out = []
        try:
            for p in paths:
                try:
                    data = p.read_bytes()
                    found = (await model.detect([data], min_score=min_score, max_detections=max_detections))[1][0]
                except OSError as exc:
                    found = f"cannot read {p}: {exc.strerror or exc}"
                except VisearchError as exc:
                    found = str(exc).removeprefix("image 0: ")
                out.append((p, found))
        finally:
            await backend.close()
        return out

    return asyncio.run(run())
