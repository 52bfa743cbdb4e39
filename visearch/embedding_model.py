"""The embedding model as the embedding service runs it: images (or boxes in them) -> model inputs
(each distinct image decoded once, at the reduced JPEG scale its crops need) -> L2-normalised global
descriptors, and on request each image's base regions for re-ranking (visearch.regions) and its local
features (visearch.local). The gRPC servicer (services/embedding/server.py) and the benchmarks share it."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from visearch import imaging, local, regions
from visearch.common.v1 import common_pb2
from visearch.errors import FailedPrecondition, InvalidArgument
from visearch.grpcserver import decode_bounded
from visearch.inference import InferenceBackend, ModelMeta, WarmUp
from visearch.observability import EMBED_BATCH

log = logging.getLogger(__name__)
MODEL = "embedder"


def clipped(box, width: int, height: int) -> tuple[float, float, float, float]:
    """A box in pixels cut to the (width x height) image it is in."""
    return max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])


def needed_scale(box, width: int, height: int, size: int) -> float:
    """The fraction of the full resolution a crop needs: about twice the model size on its short
    side keeps crops sharp while JPEG draft decoding skips most of a large photo."""
    if box is None:
        bw, bh = width, height
    else:
        x1, y1, x2, y2 = clipped(box, width, height)
        bw, bh = x2 - x1, y2 - y1
    return min(1.0, 2 * size / max(1.0, min(bw, bh)))


def cut(img, width: int, height: int, box, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """One item from a decoded image of a (width x height) photo, possibly decoded smaller: the
    model input and the frame it shows, (x1, y1, x2, y2) in pixels of the photo."""
    if box is None:
        return imaging.to_model_input(img, size), (0.0, 0.0, float(width), float(height))
    frame = clipped(box, width, height)
    sx, sy = img.width / width, img.height / height  # per axis: a reduced decode rounds each side up
    try:
        crop = imaging.crop(img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    except imaging.ImageError:
        raise imaging.ImageError(f"crop box {tuple(box)} is empty inside a {width}x{height} image") from None
    return imaging.to_model_input(crop, size), frame


def decode_all(items: list[tuple[bytes, tuple | None]], size: int) -> dict:
    """Each distinct image of (image, box) items decoded once (a search sends the same photo for its
    box and its full frame, ingestion for each object), at the reduced JPEG scale its largest need
    allows: bytes -> (decoded image, width, height). An undecodable image is InvalidArgument naming
    its first item."""
    groups: dict[bytes, list[int]] = {}
    for i, (data, _) in enumerate(items):
        groups.setdefault(data, []).append(i)
    decoded = {}
    for data, idx in groups.items():
        try:
            width, height = imaging.image_size(data)
            need = max(needed_scale(items[i][1], width, height, size) for i in idx)
            decoded[data] = (imaging.decode_image_scaled(data, draft_scale=need)[0], width, height)
        except imaging.ImageError as exc:
            raise InvalidArgument(f"item {idx[0]}: {exc}") from None
    return decoded


def prepare_all(items: list[tuple[bytes, tuple | None]], size: int, decoded: dict | None = None
                ) -> list[tuple[np.ndarray, tuple]]:
    """Model inputs for (image, box) items, each distinct image decoded once (`decode_all`).
    `decoded`, when given, receives each distinct image: bytes -> (decoded image, width, height)."""
    images = decode_all(items, size)
    if decoded is not None:
        decoded.update(images)
    out = []
    for i, (data, box) in enumerate(items):
        try:
            out.append(cut(*images[data], box, size))
        except imaging.ImageError as exc:
            raise InvalidArgument(f"item {i}: {exc}") from None
    return out


def prepare(data: bytes, box, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """One item's model input and frame (`prepare_all` for one)."""
    return prepare_all([(data, box)], size)[0]


def check_boxes(items: list[tuple[bytes, tuple | None]], decoded: dict) -> dict:
    """`decoded` once every item's box is checked as an Embed call checks it (a box with no area
    inside its image is InvalidArgument naming the item)."""
    for i, (data, box) in enumerate(items):
        if box is None:
            continue
        _, width, height = decoded[data]
        x1, y1, x2, y2 = clipped(box, width, height)
        if x2 <= x1 or y2 <= y1:
            raise InvalidArgument(f"item {i}: crop box {tuple(box)} is empty inside a {width}x{height} image")
    return decoded


def local_features(items: list[tuple[bytes, tuple | None]], decoded: dict, limit: int, max_side: int) -> list[bytes]:
    """Each item's local features (visearch.local, compact form): extracted once per distinct image
    (RootSIFT, at most `max_side` px on the longer side), then the strongest `limit` inside the item's box."""
    extractor = local.RootSift(max_side=max_side)
    per_image: dict[bytes, local.Features] = {}
    for data, (img, width, height) in decoded.items():
        feats = extractor(np.asarray(img))
        feats.xy *= np.array([width / img.width, height / img.height], np.float32)  # a reduced decode's pixels
        per_image[data] = feats
    out = []
    for data, box in items:
        feats = per_image[data]
        out.append(feats.inside(box if box is not None else (0.0, 0.0, float("inf"), float("inf")), limit).to_bytes())
    return out


def region_set(region_map: np.ndarray, energy: np.ndarray, query: np.ndarray, frame) -> common_pb2.RegionSet:
    """Base regions (OSPP + FMP) of one image, boxes mapped from the map to original pixels."""
    base = regions.base_regions(region_map, energy)
    x1, y1, x2, y2 = frame
    w, h = x2 - x1, y2 - y1
    boxes = [common_pb2.BoundingBox(x1=x1 + b[0] * w, y1=y1 + b[1] * h, x2=x1 + b[2] * w, y2=y1 + b[3] * h)
             for b in base.boxes.tolist()]
    return common_pb2.RegionSet(dim=int(base.features.shape[1]), features=base.features.ravel().tolist(), boxes=boxes,
                                query=query.tolist())


def region_sets(region_map: np.ndarray, energy: np.ndarray, query: np.ndarray, frames: list) -> list[common_pb2.RegionSet]:
    return [region_set(region_map[j], energy[j], query[j], f) for j, f in enumerate(frames)]


class Embedder:
    """Batches images through the backend; the gRPC servicer and tests share it."""

    def __init__(self, backend: InferenceBackend, max_batch: int, decode_timeout: float = 10.0,
                 local_side: int = local.MAX_SIDE):
        self.local_side = local_side
        self.backend = backend
        self.max_batch = max_batch
        self.decode_timeout = decode_timeout
        self._warm_up = WarmUp(self._warm)

    async def meta(self, version: str = "") -> ModelMeta:
        return await self.backend.metadata(MODEL, version)

    async def ready(self) -> bool:
        """Model loaded and warmed up: the first forward of a session allocates its buffers
        (hundreds of ms), so each session runs once on a blank image before the service says SERVING."""
        if not await self.backend.ready(MODEL):
            return False
        await self._warm_up()
        return True

    async def _warm(self) -> None:
        meta = await self.meta()
        names = [meta.output_name, *meta.region_outputs]
        t0 = time.perf_counter()
        blank = np.zeros((1, meta.input_size, meta.input_size, 3), np.uint8)
        await asyncio.gather(*(self.backend.infer(MODEL, {meta.input_name: blank}, names)
                               for _ in range(self.backend.parallel_runs)))
        log.info("model warmed up", extra={"model": meta.tag, "ms": round((time.perf_counter() - t0) * 1000, 1)})

    async def extract_local(self, items: list[tuple[bytes, tuple | None]], limit: int, version: str = "",
                            side: int = 0) -> list[bytes]:
        """Each item's local features (up to `limit`) without a forward: the bytes `embed_with_regions`
        returns for them (each image decoded as an Embed call with model `version` decodes it)."""
        meta = await self.meta(version)
        decoded = await decode_bounded(lambda: check_boxes(items, decode_all(items, meta.input_size)),
                                       self.decode_timeout)
        return await asyncio.to_thread(local_features, items, decoded, limit, side or self.local_side)

    async def embed(self, items: list[tuple[bytes, tuple | None]]) -> np.ndarray:
        return (await self.embed_with_regions(items, False))[0]

    async def embed_with_regions(self, items: list[tuple[bytes, tuple | None]], with_regions: bool = True,
                                 version: str = "", local_limit: int = 0, local_side: int = 0
                                 ) -> tuple[np.ndarray, list[common_pb2.RegionSet] | None, list[bytes] | None]:
        """Global descriptors [N, D] and, if asked, each item's base regions (model `version`, "" = default)
        and its local features (up to `local_limit` each; 0: none), extracted while the model runs."""
        meta = await self.meta(version)
        region_outputs = meta.region_outputs if with_regions else None
        if with_regions and not region_outputs:
            raise FailedPrecondition(f"model {meta.tag} has no region outputs: rebuild it (visearch models build)")

        decoded: dict = {}
        prepared = await decode_bounded(lambda: prepare_all(items, meta.input_size, decoded), self.decode_timeout)
        local_task = (asyncio.ensure_future(asyncio.to_thread(local_features, items, decoded, local_limit,
                                                              local_side or self.local_side))
                      if local_limit > 0 else None)
        names = [meta.output_name, *(region_outputs or [])]
        out: list[np.ndarray] = []
        sets: list[common_pb2.RegionSet] = []
        for start in range(0, len(prepared), self.max_batch):
            part = prepared[start:start + self.max_batch]
            batch = np.stack([p[0] for p in part])
            EMBED_BATCH.observe(len(batch))
            result = await self.backend.infer(MODEL, {meta.input_name: batch}, names, version=version)
            out.append(result[meta.output_name])
            if region_outputs:
                sets += await asyncio.to_thread(region_sets, *(result[n] for n in region_outputs), [p[1] for p in part])
        vectors = np.concatenate(out).astype(np.float32, copy=False)
        if vectors.shape[1] != meta.dim:
            raise RuntimeError(f"model {meta.tag} returned dim {vectors.shape[1]}, meta says {meta.dim}")
        return vectors, (sets if region_outputs else None), (await local_task if local_task is not None else None)
