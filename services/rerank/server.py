"""Re-ranking service: re-scores the gateway's candidates.

Methods (visearch.regions; measured in docs/RERANK.md):
- "none": the global-descriptor order, unchanged;
- "regions": each candidate scored by its best single base region against the query;
- "qam": query-adaptive matching: the best merge of the candidate's base regions;
- "qe": alpha-weighted query expansion over the candidates' global vectors.
Region methods return the matched region's box (pixels of the catalog image). A
candidate stored without regions keeps its global score. Region and global vectors are
read from the catalog's Milvus collections by primary key; without a store only "none"
is available. An unknown method is INVALID_ARGUMENT, never a silent fallback.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
from pymilvus.exceptions import MilvusException

from visearch import regions
from visearch.common.v1 import common_pb2
from visearch.errors import FailedPrecondition, InvalidArgument, Unavailable
from visearch.grpcserver import Service, rpc, serve
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from visearch.settings import RerankSettings
from visearch.store import BOUNDED, STRONG, Generation, VectorStore

log = logging.getLogger(__name__)
METHODS = regions.RERANK_METHODS


class LazyStore:
    """The vector store, connected on first use (and retried after a failure), so the service starts
    and reports NOT_SERVING while Milvus is away instead of exiting."""

    def __init__(self, settings: RerankSettings):
        self.settings = settings
        self._store: VectorStore | None = None
        self._lock = threading.Lock()

    def get(self) -> VectorStore:
        with self._lock:
            if self._store is None:
                try:
                    self._store = VectorStore(self.settings)
                except MilvusException as exc:
                    raise Unavailable(f"vector store at {self.settings.milvus_uri} unreachable: {exc}") from None
            return self._store

    def __getattr__(self, name: str):  # get_vectors, get_regions, ping: on the connected store
        return getattr(self.get(), name)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, settings: RerankSettings, store: LazyStore | VectorStore | None):
        default = settings.rerank_default if store is not None else "none"
        if default not in METHODS:
            raise ValueError(f"default re-rank method {default!r} is not one of {METHODS}")
        self.s, self.store, self.default = settings, store, default

    @rpc()
    async def Rerank(self, request, context):
        method = request.method or self.default
        if method not in METHODS:
            raise InvalidArgument(f"re-rank method {method!r} is not available (available: {', '.join(METHODS)})")
        cands = sorted(request.candidates, key=lambda c: -c.score)
        boxes: dict[str, np.ndarray] = {}
        if method != "none" and cands:
            if self.store is None:
                raise FailedPrecondition(f"re-rank method {method!r} reads the vector store, and this service has none "
                                         "(set VISEARCH_MILVUS_URI)")
            if method == "qe":
                scores = await asyncio.to_thread(self._qe, request, cands)
            else:
                scores, boxes = await asyncio.to_thread(self._regions, request, cands, method)
            order = np.argsort(-scores, kind="stable")
            cands = [cands[i] for i in order]
            new_scores = [float(scores[i]) for i in order]
        else:
            new_scores = [c.score for c in cands]
        if request.top_k > 0:
            cands = cands[: request.top_k]
        hits = []
        for c, score in zip(cands, new_scores, strict=False):
            hit = rerank_pb2.RerankedHit(item_id=c.item_id, object_id=c.object_id, score=score)
            if c.object_id in boxes:
                b = boxes[c.object_id]
                hit.region.CopyFrom(common_pb2.BoundingBox(x1=b[0], y1=b[1], x2=b[2], y2=b[3]))
            hits.append(hit)
        return rerank_pb2.RerankResponse(hits=hits, method=method)

    def _generation(self, request) -> Generation | str:
        """The catalog generation the gateway searched (the live one when it names none)."""
        if request.generation <= 0:
            return request.catalog
        gen = self.store.generation(request.catalog, request.generation)
        if gen is None:
            raise FailedPrecondition(f"generation {request.generation} of catalog {request.catalog!r} is gone "
                                     "(retired after a re-embedding): search again")
        return gen

    @staticmethod
    def _level(request) -> str:
        level = request.consistency or STRONG
        if level not in (STRONG, BOUNDED):
            raise InvalidArgument(f"consistency {level!r}: expected {STRONG!r} or {BOUNDED!r}")
        return level

    def _qe(self, request, cands) -> np.ndarray:
        q = np.asarray(request.query_embedding, np.float32)
        vecs = self.store.get_vectors(self._generation(request), [c.object_id for c in cands], self._level(request))
        missing = [c.object_id for c in cands if c.object_id not in vecs]
        if missing:
            raise FailedPrecondition(f"{len(missing)} candidates are not in catalog {request.catalog!r} "
                                     f"(e.g. {missing[0]!r}): deleted since the search?")
        db = np.stack([vecs[c.object_id] for c in cands])
        if q.shape != db.shape[1:]:
            raise InvalidArgument(f"query_embedding has {q.size} values, the catalog's vectors {db.shape[1]}")
        expanded = regions.alpha_qe(q, db, db @ q, self.s.qe_k, self.s.qe_alpha)
        return db @ expanded

    def _regions(self, request, cands, method: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        qr = np.asarray(request.query_region, np.float32)
        if qr.size == 0:
            raise InvalidArgument(f"re-rank method {method!r} needs query_region (the query's RegionSet.query)")
        found = self.store.get_regions(self._generation(request), [c.object_id for c in cands], self._level(request))
        scores = np.empty(len(cands), np.float32)
        boxes: dict[str, np.ndarray] = {}
        for i, c in enumerate(cands):
            reg = found.get(c.object_id)
            if reg is None:  # stored without regions: its global score stands
                scores[i] = c.score
                continue
            feats, rboxes = reg
            if feats.shape[1] != qr.size:
                raise InvalidArgument(f"query_region has {qr.size} values, catalog regions {feats.shape[1]}")
            scores[i], boxes[c.object_id] = regions.match(method, qr, feats, rboxes)
        return scores, boxes


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
