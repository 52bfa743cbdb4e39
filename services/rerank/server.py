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
import logging
import threading
from pathlib import Path

import numpy as np
from pymilvus.exceptions import MilvusException

from visearch import local, regions
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
        self._params: dict[str, local.VerifyParams] = {}

    @rpc()
    async def Rerank(self, request, context):
        method = request.method or self.default
        if not request.method and method == "verify" and not request.query_local:
            method = "qe"  # the default, asked without the query's local features: the next best method
        if method not in METHODS:
            raise InvalidArgument(f"re-rank method {method!r} is not available (available: {', '.join(METHODS)})")
        cands = sorted(request.candidates, key=lambda c: -c.score)
        boxes: dict[str, np.ndarray] = {}
        verdicts: dict[str, tuple[bool, local.Verification]] = {}
        if method != "none" and cands:
            if self.store is None:
                raise FailedPrecondition(f"re-rank method {method!r} reads the vector store, and this service has none "
                                         "(set VISEARCH_MILVUS_URI)")
            if method == "qe":
                scores = await asyncio.to_thread(self._qe, request, cands)
            elif method == "verify":
                scores, verdicts = await asyncio.to_thread(self._verify, request, cands)
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
            if c.object_id in verdicts:
                matched, v = verdicts[c.object_id]
                hit.match, hit.inliers = matched, v.inliers
                if request.correspondences:
                    hit.correspondences.extend(common_pb2.Correspondence(query_x=p[0], query_y=p[1], x=p[2], y=p[3])
                                               for p in v.pairs.tolist())
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

    def params(self, gen: Generation) -> local.VerifyParams:
        """The verification parameters recorded beside the model that made the generation's vectors
        (model_repository/<name>/<version>/verify.json), else the defaults."""
        name, _, version = gen.model_tag.partition(":")
        key = f"{name}:{version}"
        if key not in self._params:
            self._params[key] = local.VerifyParams.load(Path(self.s.model_repository) / name / version / "verify.json")
        return self._params[key]

    def _verify(self, request, cands) -> tuple[np.ndarray, dict[str, tuple[bool, local.Verification]]]:
        if not request.query_local:
            raise InvalidArgument("re-rank method 'verify' needs query_local (the query's local features)")
        try:
            query_features = local.Features.from_bytes(request.query_local)
        except (ValueError, IndexError) as exc:
            raise InvalidArgument(f"query_local is not a local-features record: {exc}") from None
        target = self._generation(request)
        gen = self.store.resolve(target)
        params = self.params(gen)
        level = self._level(request)
        q = np.asarray(request.query_embedding, np.float32)
        ids = [c.object_id for c in cands]
        vecs = self.store.get_vectors(gen, ids, level)
        missing = [i for i in ids if i not in vecs]
        if missing:
            raise FailedPrecondition(f"{len(missing)} candidates are not in catalog {request.catalog!r} "
                                     f"(e.g. {missing[0]!r}): deleted since the search?")
        db = np.stack([vecs[i] for i in ids])
        if q.shape != db.shape[1:]:
            raise InvalidArgument(f"query_embedding has {q.size} values, the catalog's vectors {db.shape[1]}")
        top = min(params.top, len(cands))
        stored = self.store.get_local(gen, ids[:top])
        feats = {}
        for j, object_id in enumerate(ids[:top]):
            if object_id in stored:
                try:
                    feats[j] = local.Features.from_bytes(stored[object_id])
                except (ValueError, IndexError):  # a damaged file: that candidate is not verified
                    log.warning("unreadable local features", extra={"object_id": object_id[:80]})
        boxes = {j: (c.box.x1, c.box.y1, c.box.x2, c.box.y2) for j, c in enumerate(cands[:top])}
        area = float(max(1, request.query_width) * max(1, request.query_height))
        ranked = local.rerank(q, db, np.array([c.score for c in cands], np.float32), query_features, feats, boxes,
                              area, params)
        fused = np.empty(len(cands), np.float32)
        fused[ranked.order] = ranked.scores
        verdicts = {ids[i]: (i in ranked.matched, v) for i, v in ranked.checks.items()}
        return fused, verdicts

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
