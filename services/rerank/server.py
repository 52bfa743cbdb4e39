"""Re-ranking service: re-scores the gateway's candidates.

Region-level matching (QAM) lands with issue 5; until then the only method is
"none", which keeps the global-descriptor order. Asking for a method the service
does not have is INVALID_ARGUMENT, never a silent fallback.
"""

from __future__ import annotations

from visearch.errors import InvalidArgument
from visearch.grpcserver import Service, rpc, serve
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from visearch.settings import RerankSettings

METHODS = ("none",)


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, default: str = "none"):
        if default not in METHODS:
            raise ValueError(f"default re-rank method {default!r} is not one of {METHODS}")
        self.default = default

    @rpc()
    async def Rerank(self, request, context):
        method = request.method or self.default
        if method not in METHODS:
            raise InvalidArgument(f"re-rank method {method!r} is not available (available: {', '.join(METHODS)})")
        ordered = sorted(request.candidates, key=lambda c: -c.score)
        if request.top_k > 0:
            ordered = ordered[: request.top_k]
        hits = [rerank_pb2.RerankedHit(item_id=c.item_id, object_id=c.object_id, score=c.score) for c in ordered]
        return rerank_pb2.RerankResponse(hits=hits, method=method)


async def main(settings: RerankSettings, **kw) -> None:
    service = Service(rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name,
                      rerank_pb2_grpc.add_RerankServiceServicer_to_server, RerankServicer(settings.rerank_default))

    async def ready() -> bool:
        return True  # stateless until region vectors arrive with issue 5

    await serve([service], settings, settings.rerank_port, ready=ready, **kw)
