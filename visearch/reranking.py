"""The re-rank methods over a catalog's stored vectors, regions and local features, as plain code: the
re-rank service (services/rerank/server.py) converts its protobuf to and from these types.

Methods (visearch.regions; measured in docs/RERANK.md): "none" keeps the global order; "regions" and
"qam" score each candidate by its base regions against the query's; "qe" is alpha-weighted query
expansion over the candidates' global vectors; "verify" checks the top candidates' local features
geometrically (visearch.local, docs/VERIFY.md). A new method goes in visearch.regions or
visearch.local (the scoring) and in `Reranker.rerank` here (what it reads from the store).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymilvus.exceptions import MilvusException

from visearch import local, regions
from visearch.errors import FailedPrecondition, InvalidArgument, Unavailable
from visearch.settings import RerankSettings
from visearch.store import BOUNDED, STRONG, Generation, VectorStore

log = logging.getLogger(__name__)
METHODS = regions.RERANK_METHODS


@dataclass(frozen=True)
class Candidate:
    item_id: str
    object_id: str
    score: float  # the global-descriptor similarity it was retrieved with
    box: tuple[float, float, float, float]  # the stored object's box in its catalog image (pixels)


@dataclass(frozen=True)
class Query:
    catalog: str
    embedding: np.ndarray  # float32, the query's global descriptor
    region: np.ndarray  # float32, the query in the region space ("regions", "qam"); may be empty
    local_features: bytes = b""  # the query's local features ("verify")
    width: int = 0
    height: int = 0
    generation: int = 0  # 0: the live one
    consistency: str = ""  # "" = Strong


@dataclass
class Reranked:
    method: str
    candidates: list[Candidate]  # best first, at most top_k
    scores: list[float]
    boxes: dict[str, np.ndarray] = field(default_factory=dict)  # object id -> matched region, catalog pixels
    verdicts: dict[str, tuple[bool, local.Verification]] = field(default_factory=dict)  # object id -> (match, check)


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


class Reranker:
    def __init__(self, settings: RerankSettings, store: LazyStore | VectorStore | None):
        default = settings.rerank_default if store is not None else "none"
        if default not in METHODS:
            raise ValueError(f"default re-rank method {default!r} is not one of {METHODS}")
        self.s, self.store, self.default = settings, store, default
        self._params: dict[str, local.VerifyParams] = {}

    def method(self, asked: str, has_local: bool) -> str:
        """The method a request gets: the one it asks for, else the default."""
        method = asked or self.default
        if not asked and method == "verify" and not has_local:
            method = "qe"  # the default, asked without the query's local features: the next best method
        if method not in METHODS:
            raise InvalidArgument(f"re-rank method {method!r} is not available (available: {', '.join(METHODS)})")
        return method

    async def rerank(self, method: str, query: Query, candidates: list[Candidate], top_k: int = 0) -> Reranked:
        cands = sorted(candidates, key=lambda c: -c.score)
        boxes: dict[str, np.ndarray] = {}
        verdicts: dict[str, tuple[bool, local.Verification]] = {}
        if method != "none" and cands:
            if self.store is None:
                raise FailedPrecondition(f"re-rank method {method!r} reads the vector store, and this service has none "
                                         "(set VISEARCH_MILVUS_URI)")
            if method == "qe":
                scores = await asyncio.to_thread(self._qe, query, cands)
            elif method == "verify":
                scores, verdicts = await self._verify(query, cands)
            else:
                scores, boxes = await asyncio.to_thread(self._regions, query, cands, method)
            order = np.argsort(-scores, kind="stable")
            cands = [cands[i] for i in order]
            new_scores = [float(scores[i]) for i in order]
        else:
            new_scores = [c.score for c in cands]
        if top_k > 0:
            cands = cands[:top_k]
        return Reranked(method, cands, new_scores[:len(cands)], boxes, verdicts)

    def _generation(self, query: Query) -> Generation | str:
        """The catalog generation the gateway searched (the live one when it names none)."""
        if query.generation <= 0:
            return query.catalog
        gen = self.store.generation(query.catalog, query.generation)
        if gen is None:
            raise FailedPrecondition(f"generation {query.generation} of catalog {query.catalog!r} is gone "
                                     "(retired after a re-embedding): search again")
        return gen

    @staticmethod
    def _level(query: Query) -> str:
        level = query.consistency or STRONG
        if level not in (STRONG, BOUNDED):
            raise InvalidArgument(f"consistency {level!r}: expected {STRONG!r} or {BOUNDED!r}")
        return level

    def _candidate_vectors(self, target: Generation | str, query: Query, cands: list[Candidate]) -> np.ndarray:
        """The candidates' global vectors [n, d], in their order; every one must still be stored."""
        vecs = self.store.get_vectors(target, [c.object_id for c in cands], self._level(query))
        missing = [c.object_id for c in cands if c.object_id not in vecs]
        if missing:
            raise FailedPrecondition(f"{len(missing)} candidates are not in catalog {query.catalog!r} "
                                     f"(e.g. {missing[0]!r}): deleted since the search?")
        db = np.stack([vecs[c.object_id] for c in cands])
        if query.embedding.shape != db.shape[1:]:
            raise InvalidArgument(f"query_embedding has {query.embedding.size} values, the catalog's vectors "
                                  f"{db.shape[1]}")
        return db

    def _qe(self, query: Query, cands: list[Candidate]) -> np.ndarray:
        q = query.embedding
        db = self._candidate_vectors(self._generation(query), query, cands)
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

    async def _verify(self, query: Query, cands: list[Candidate]
                      ) -> tuple[np.ndarray, dict[str, tuple[bool, local.Verification]]]:
        if not query.local_features:
            raise InvalidArgument("re-rank method 'verify' needs query_local (the query's local features)")
        try:
            query_features = local.Features.from_bytes(query.local_features)
        except (ValueError, IndexError) as exc:
            raise InvalidArgument(f"query_local is not a local-features record: {exc}") from None
        self._level(query)  # a bad consistency fails before any read

        def resolved() -> tuple[Generation, local.VerifyParams]:
            gen = self.store.resolve(self._generation(query))
            return gen, self.params(gen)

        gen, params = await asyncio.to_thread(resolved)
        top = min(params.top, len(cands))
        # The candidates' vectors (for the expansion) are read while the top ones' local features are
        # read and verified: one thread waits on the store while the other computes. Both finish; a
        # candidate gone from the catalog is reported before anything its features say.
        db, checks = await asyncio.gather(asyncio.to_thread(self._candidate_vectors, gen, query, cands),
                                          asyncio.to_thread(self._checks, gen, query_features, cands[:top]),
                                          return_exceptions=True)
        for outcome in (db, checks):
            if isinstance(outcome, BaseException):
                raise outcome
        boxes = {j: c.box for j, c in enumerate(cands[:top])}
        area = float(max(1, query.width) * max(1, query.height))
        ranked = local.fuse(query.embedding, db, np.array([c.score for c in cands], np.float32), checks, boxes, area,
                            params)
        fused = np.empty(len(cands), np.float32)
        fused[ranked.order] = ranked.scores
        ids = [c.object_id for c in cands]
        verdicts = {ids[i]: (i in ranked.matched, v) for i, v in ranked.checks.items()}
        return fused, verdicts

    def _checks(self, gen: Generation, query_features: local.Features, top: list[Candidate]
                ) -> dict[int, local.Verification]:
        """The verification of each of the `top` candidates that has local features stored."""
        ids = [c.object_id for c in top]
        stored = self.store.get_local(gen, ids)
        feats = {}
        for j, object_id in enumerate(ids):
            if object_id in stored:
                try:
                    feats[j] = local.Features.from_bytes(stored[object_id])
                except (ValueError, IndexError):  # a damaged file: that candidate is not verified
                    log.warning("unreadable local features", extra={"object_id": object_id[:80]})
        for f in feats.values():
            try:
                local.check_comparable(query_features, f)
            except ValueError as exc:
                raise InvalidArgument(f"query_local does not match the catalog's local features: {exc}") from None
        return local.verify_top(query_features, feats, len(top))

    def _regions(self, query: Query, cands: list[Candidate], method: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        qr = query.region
        if qr.size == 0:
            raise InvalidArgument(f"re-rank method {method!r} needs query_region (the query's RegionSet.query)")
        found = self.store.get_regions(self._generation(query), [c.object_id for c in cands], self._level(query))
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
