"""Embedding service: images (or boxes in them) -> L2-normalised global descriptors."""

from __future__ import annotations

import logging

import numpy as np

from visearch import imaging
from visearch.common.v1 import common_pb2
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.errors import InvalidArgument
from visearch.grpcserver import Service, decode_bounded, rpc, serve
from visearch.inference import InferenceBackend, ModelMeta, make_backend
from visearch.observability import EMBED_BATCH
from visearch.settings import EmbeddingSettings

log = logging.getLogger(__name__)
MODEL = "embedder"


def model_info(meta: ModelMeta) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=meta.name, version=meta.version, dim=meta.dim, metric=meta.metric,
                                architecture=meta.architecture, pooling=meta.pooling, input_size=meta.input_size,
                                weights_sha256=meta.weights_sha256)


def box_of(msg) -> tuple[float, float, float, float] | None:
    return (msg.x1, msg.y1, msg.x2, msg.y2) if msg is not None else None


def prepare(data: bytes, box, size: int) -> np.ndarray:
    # JPEG draft decoding at about twice the model size keeps crops sharp enough
    # while skipping most of the full-resolution decode.
    img = imaging.decode_image(data, draft_size=None if box is not None else 2 * size)
    return imaging.to_model_input(imaging.crop(img, box), size)


class Embedder:
    """Batches images through the backend; the gRPC servicer and tests share it."""

    def __init__(self, backend: InferenceBackend, max_batch: int, decode_timeout: float = 10.0):
        self.backend = backend
        self.max_batch = max_batch
        self.decode_timeout = decode_timeout

    async def meta(self) -> ModelMeta:
        return await self.backend.metadata(MODEL)

    async def embed(self, items: list[tuple[bytes, tuple | None]]) -> np.ndarray:
        meta = await self.meta()

        def prep(i: int, data: bytes, box) -> np.ndarray:
            try:
                return prepare(data, box, meta.input_size)
            except imaging.ImageError as exc:
                raise InvalidArgument(f"item {i}: {exc}") from None

        arrays = await decode_bounded(lambda: [prep(i, d, b) for i, (d, b) in enumerate(items)], self.decode_timeout)
        out = []
        for start in range(0, len(arrays), self.max_batch):
            batch = np.stack(arrays[start:start + self.max_batch])
            EMBED_BATCH.observe(len(batch))
            result = await self.backend.infer(MODEL, {meta.input_name: batch})
            out.append(result[meta.output_name])
        vectors = np.concatenate(out).astype(np.float32, copy=False)
        if vectors.shape[1] != meta.dim:
            raise RuntimeError(f"model {meta.tag} returned dim {vectors.shape[1]}, meta says {meta.dim}")
        return vectors


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    @rpc()
    async def Embed(self, request, context):
        if not request.items:
            raise InvalidArgument("no items to embed")
        items = [(it.image, box_of(it.box) if it.HasField("box") else None) for it in request.items]
        vectors = await self.embedder.embed(items)
        meta = await self.embedder.meta()
        return embedding_pb2.EmbedResponse(
            embeddings=[embedding_pb2.Embedding(values=v) for v in vectors], model=model_info(meta))

    @rpc()
    async def GetModelInfo(self, request, context):
        return embedding_pb2.GetModelInfoResponse(model=model_info(await self.embedder.meta()))


async def main(settings: EmbeddingSettings, **kw) -> None:
    backend = make_backend(settings)
    embedder = Embedder(backend, settings.max_batch, settings.decode_timeout_seconds)
    service = Service(embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
                      embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, EmbeddingServicer(embedder))
    await serve([service], settings, settings.embedding_port, ready=lambda: backend.ready(MODEL),
                on_stop=backend.close, **kw)
