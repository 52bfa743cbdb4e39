"""Re-ranking service: re-scores the gateway's candidates.

Methods (visearch.regions; measured in docs/RERANK.md):
- "none": the global-descriptor order, unchanged;
- "regions": each candidate scored by its best single base region against the query;
- "qam": query-adaptive matching: the best merge of the candidate's base regions;
- "qe": alpha-weighted query expansion over the candidates' global vectors;
- "verify": geometric verification of the top candidates' local features against the query's,
  spatially verified query expansion, the fused score and the match decision (visearch.local,
  docs/VERIFY.md), with the parameters recorded beside the catalog's model (`verify.json`).
Region methods return the matched region's box (pixels of the catalog image). A
candidate stored without regions keeps its global score. Region and global vectors are
read from the catalog's Milvus collections by primary key; without a store only "none"
is available. An unknown method is INVALID_ARGUMENT, never a silent fallback.
"""

from __future__ import annotations

import asyncio

import numpy as np
from pymilvus.exceptions import MilvusException

from visearch.common.v1 import common_pb2
from visearch.errors import Unavailable
from visearch.grpcserver import Service, rpc, serve
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from visearch.reranking import Candidate, LazyStore, Query, Reranker
from visearch.settings import RerankSettings
from visearch.store import VectorStore


def candidate_of(c: rerank_pb2.Candidate) -> Candidate:
    return Candidate(c.item_id, c.object_id, c.score, (c.box.x1, c.box.y1, c.box.x2, c.box.y2))


def query_of(request: rerank_pb2.RerankRequest) -> Query:
    return Query(catalog=request.catalog, embedding=np.asarray(request.query_embedding, np.float32),
                 region=np.asarray(request.query_region, np.float32), local_features=request.query_local,
                 width=request.query_width, height=request.query_height, generation=request.generation,
                 consistency=request.consistency)


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, settings: RerankSettings, store: LazyStore | VectorStore | None):
        self.reranker = Reranker(settings, store)

    @rpc()
    async def Rerank(self, request, context):
        method = self.reranker.method(request.method, bool(request.query_local))
        out = await self.reranker.rerank(method, query_of(request), [candidate_of(c) for c in request.candidates],
                                         request.top_k)
        hits = []
        for c, score in zip(out.candidates, out.scores, strict=True):
            hit = rerank_pb2.RerankedHit(item_id=c.item_id, object_id=c.object_id, score=score)
            if c.object_id in out.boxes:
                b = out.boxes[c.object_id]
                hit.region.CopyFrom(common_pb2.BoundingBox(x1=b[0], y1=b[1], x2=b[2], y2=b[3]))
            if c.object_id in out.verdicts:
                matched, v = out.verdicts[c.object_id]
                hit.match, hit.inliers = matched, v.inliers
                if request.correspondences:
                    hit.correspondences.extend(common_pb2.Correspondence(query_x=p[0], query_y=p[1], x=p[2], y=p[3])
                                               for p in v.pairs.tolist())
            hits.append(hit)
        return rerank_pb2.RerankResponse(hits=hits, method=method)


async def main(settings: RerankSettings, **kw) -> None:
    store = LazyStore(settings) if settings.milvus_uri else None
    servicer = RerankServicer(settings, store)
    service = Service(rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name,
                      rerank_pb2_grpc.add_RerankServiceServicer_to_server, servicer)

    async def ready() -> bool:
        if store is None:
            return True
        try:
            return await asyncio.to_thread(store.ping)
        except (Unavailable, MilvusException):
            return False

    await serve([service], settings, settings.rerank_port, ready=ready,
                on_stop=(lambda: asyncio.to_thread(store.close)) if store else None, **kw)
