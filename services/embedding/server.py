"""Embedding service: images (or boxes in them) -> L2-normalised global descriptors,
and on request each image's base regions for re-ranking (visearch.regions)."""

from __future__ import annotations

from visearch import local
from visearch.common.v1 import common_pb2
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.embedding_model import Embedder
from visearch.errors import InvalidArgument
from visearch.grpcserver import Service, rpc, serve
from visearch.inference import ModelMeta, make_backend
from visearch.settings import EmbeddingSettings

MAX_LOCAL = 4000  # local features one item may ask for


def model_info(meta: ModelMeta) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=meta.name, version=meta.version, dim=meta.dim, metric=meta.metric,
                                architecture=meta.architecture, pooling=meta.pooling, input_size=meta.input_size,
                                weights_sha256=meta.weights_sha256)


def box_of(msg) -> tuple[float, float, float, float] | None:
    return (msg.x1, msg.y1, msg.x2, msg.y2) if msg is not None else None


def items_of(request) -> list[tuple[bytes, tuple[float, float, float, float] | None]]:
    return [(it.image, box_of(it.box) if it.HasField("box") else None) for it in request.items]


def local_limit(request) -> int:
    """The local-feature settings of an Embed or ExtractLocal request, checked: the features wanted
    per item (0 asks for the per-object budget)."""
    if not 0 <= request.local_limit <= MAX_LOCAL:
        raise InvalidArgument(f"local_limit must be between 0 and {MAX_LOCAL}, got {request.local_limit}")
    if not (request.local_max_side == 0 or local.MIN_SIDE <= request.local_max_side <= local.MAX_SIDE):
        raise InvalidArgument(f"local_max_side must be 0 or between {local.MIN_SIDE} and {local.MAX_SIDE}, "
                              f"got {request.local_max_side}")
    return request.local_limit or local.capacity("rootsift", 32)


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    @rpc()
    async def Embed(self, request, context):
        if not request.items:
            raise InvalidArgument("no items to embed")
        items = items_of(request)
        limit = local_limit(request)  # its settings are checked even when no features are asked for
        limit = limit if request.local_features else 0
        vectors, sets, feats = await self.embedder.embed_with_regions(items, request.regions, request.model_version,
                                                                      limit, request.local_max_side)
        meta = await self.embedder.meta(request.model_version)
        # Python floats fill a repeated field about 5x faster than numpy scalars (1 ms a vector).
        rows = vectors.tolist()
        embeddings = [embedding_pb2.Embedding(values=v) for v in rows]
        for j, e in enumerate(embeddings):
            if sets is not None:
                e.regions.CopyFrom(sets[j])
            if feats is not None:
                e.local_features = feats[j]
        return embedding_pb2.EmbedResponse(embeddings=embeddings, model=model_info(meta))

    @rpc()
    async def ExtractLocal(self, request, context):
        if not request.items:
            raise InvalidArgument("no items to extract local features from")
        feats = await self.embedder.extract_local(items_of(request), local_limit(request), request.model_version,
                                                  request.local_max_side)
        return embedding_pb2.ExtractLocalResponse(local_features=feats)

    @rpc()
    async def GetModelInfo(self, request, context):
        return embedding_pb2.GetModelInfoResponse(model=model_info(await self.embedder.meta(request.model_version)))


async def main(settings: EmbeddingSettings, **kw) -> None:
    backend = make_backend(settings)
    embedder = Embedder(backend, settings.max_batch, settings.decode_timeout_seconds, settings.local_side)
    service = Service(embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
                      embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, EmbeddingServicer(embedder))
    await serve([service], settings, settings.embedding_port, ready=embedder.ready,
                on_stop=backend.close, **kw)
