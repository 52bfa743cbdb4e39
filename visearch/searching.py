"""The search pipeline as plain code: a query photo (or a stored item) -> its views -> vectors ->
store rows -> each item's best object -> re-ranked hits.

The remote steps are injected (`SearchPorts`: detect, embed, re-rank, the caller's time left) and
the store is anything with `SearchStore`'s methods (visearch.store.VectorStore in the gateway), so
the pipeline runs in-process in tests with no mesh. The gateway's servicer
(services/gateway/server.py) checks the request, resolves the catalog's live generation, runs
`SearchPipeline.search` and converts the result to protobuf (visearch/convert.py). The decisions
taken on the way (which views, how many rows, how rows become candidates) are visearch/search.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from visearch import imaging, regions, search
from visearch.errors import FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.search import Box
from visearch.store import Generation, StoredObject

MAX_QUERY_OBJECTS = 5  # objects searched on their own with per_object


@dataclass(frozen=True)
class QueryLocal:
    """The query's local features for "verify", and the size of the frame they come from."""

    features: bytes = b""
    width: float = 0.0
    height: float = 0.0
    correspondences: bool = False


@dataclass(frozen=True)
class SearchQuery:
    """One search, checked by the caller: by image bytes or by a stored item's id."""

    image: bytes = b""
    item_id: str = ""
    top_k: int = 10
    filters: dict[str, str] = field(default_factory=dict)
    full_frame: bool = False
    per_object: bool = False
    rerank: str = ""  # the method asked for ("": the default)
    correspondences: bool = False


@dataclass(frozen=True)
class SearchConfig:
    """The gateway settings the pipeline reads (visearch.settings.GatewaySettings)."""

    query_objects: str = "both"
    rerank_default: str = "verify"
    rerank_candidates: int = 100
    query_crop_margin: float = 0.0
    catalog_crop_margin: float = 0.0
    early_full_frame_search: bool = True

    @classmethod
    def of(cls, settings) -> SearchConfig:
        return cls(query_objects=settings.query_objects, rerank_default=settings.rerank_default,
                   rerank_candidates=settings.rerank_candidates, query_crop_margin=settings.query_crop_margin,
                   catalog_crop_margin=settings.catalog_crop_margin,
                   early_full_frame_search=settings.early_full_frame_search)


@dataclass(frozen=True)
class Detection:
    box: Box
    score: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class Detected:
    """The detector's answer for the query photo: its size and the objects found, best first."""

    width: float
    height: float
    detections: list[Detection]


@dataclass(frozen=True)
class EmbedCall:
    """Embed views of one photo with one model version: boxes in pixels (None: the full frame)."""

    image: bytes
    boxes: list[Box | None]
    model_version: str
    regions: bool


@dataclass(frozen=True)
class LocalCall:
    """The query's local features (visearch.local), of one view of the photo (a box in pixels; None:
    the full frame), decoded as the embedder of `model_version` decodes it."""

    image: bytes
    box: Box | None
    model_version: str


@dataclass
class Embedded:
    values: Sequence[float]
    regions_query: Sequence[float] = ()


@dataclass
class EmbedAnswer:
    """One embedding per view asked, in order; `meta` is checked against the generation, `model`
    (the service's own record of it) is handed back in the result."""

    embeddings: list[Embedded]
    meta: ModelMeta
    model: Any = None


@dataclass(frozen=True)
class RerankCall:
    gen: Generation
    level: str
    vector: list[float]
    candidates: list[tuple[float, StoredObject]]  # (score, object), best first
    method: str
    top_k: int
    query_region: list[float]
    local: QueryLocal


@dataclass(frozen=True)
class Ranked:
    """A re-ranked item; `detail` is what the re-ranker said beside its score (region, inliers ...),
    carried to the response untouched."""

    item_id: str
    score: float
    detail: Any = None


@dataclass(frozen=True)
class Reranked:
    hits: list[Ranked]
    method: str


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    object: StoredObject  # the item's best object (its box and metadata)
    detail: Any = None


@dataclass(frozen=True)
class ObjectResult:
    detection: Detection
    hits: list[Hit]


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    query_box: Box
    method: str
    model: Any = None  # the embedding service's model record; None in a search by item (the generation's)
    objects: list[ObjectResult] = field(default_factory=list)


class SearchStore(Protocol):
    """What the pipeline reads of the vector store (visearch.store.VectorStore); called in threads."""

    def read_level(self, gen: Generation) -> str: ...
    def check_model(self, gen: Generation, meta: ModelMeta) -> None: ...
    def get_item(self, gen: Generation, item_id: str) -> list[StoredObject]: ...
    def get_vectors(self, gen: Generation, object_ids: list[str], level: str) -> dict: ...
    def get_local(self, gen: Generation, object_ids: list[str]) -> dict[str, bytes]: ...
    def search_many(self, gen: Generation, vectors, limit: int, filters: dict[str, str] | None = None, *,
                    level: str | None = None) -> list[list[StoredObject]]: ...


@dataclass
class SearchPorts:
    """The remote steps of one search (the gateway binds them to its stubs and the caller's deadline)."""

    detect: Callable[[bytes, int], Awaitable[Detected]]
    embed: Callable[[EmbedCall], Awaitable[EmbedAnswer]]
    rerank: Callable[[RerankCall], Awaitable[Reranked]]
    local: Callable[[LocalCall], Awaitable[bytes]]
    time_left: Callable[[], float | None] = lambda: None


def check_method(method: str) -> str:
    if method not in regions.RERANK_METHODS:  # before any work is done for it
        raise InvalidArgument(f"re-rank method {method[:40]!r} is not available "
                              f"(available: {', '.join(regions.RERANK_METHODS)})")
    return method


def _abandon(*tasks: asyncio.Future | None) -> None:
    """Cancel calls whose answers are no longer wanted (another error is reported); an error one of
    them already has is retrieved, so it is not logged as never seen."""
    for t in tasks:
        if t is None:
            continue
        t.cancel()
        if t.done() and not t.cancelled():
            t.exception()


class SearchPipeline:
    def __init__(self, store: SearchStore, config: SearchConfig):
        self.store = store
        self.cfg = config

    async def search(self, query: SearchQuery, gen: Generation, ports: SearchPorts) -> SearchResult:
        """Search generation `gen` (resolved once by the caller: every read of this search and the
        query's model version come from it, even if a re-embedding switches the catalog meanwhile)."""
        policy = "full" if query.full_frame else self.cfg.query_objects
        # The query's regions cost a few ms and 20 kB: fetched only for a region method.
        method = check_method(query.rerank or self.cfg.rerank_default)
        want_regions = method in regions.REGION_METHODS
        if want_regions and query.item_id:
            raise FailedPrecondition(f"re-rank {method!r} needs a query photo's regions, which a search by "
                                     "item_id does not have: use verify, qe or none")
        if want_regions and gen.regions == "off":
            raise FailedPrecondition(f"catalog {gen.catalog!r} stores no regions (made with regions off): re-rank "
                                     f"{method!r} needs them; make the catalog with `visearch ingest --regions "
                                     "float` (or int8), or use another method")
        # "verify" matches the query's local features (extracted by the embedding service) against the
        # candidates' stored ones.
        want_local = method == "verify"
        if query.item_id:
            return await self._similar(query, gen, ports, policy, method, want_local)
        return await self._photo(query, gen, ports, policy, method, want_regions, want_local)

    async def _photo(self, query: SearchQuery, gen: Generation, ports: SearchPorts, policy: str, method: str,
                     want_regions: bool, want_local: bool) -> SearchResult:
        # One read level for the whole search (Bounded unless the catalog was written lately), read
        # while the forwards run; `early` holds a search started before the others (see below).
        level_task = asyncio.ensure_future(asyncio.to_thread(self.store.read_level, gen))
        early: list[asyncio.Future] = []
        try:
            return await self._photo_views(query, gen, ports, policy, method, want_regions, want_local, level_task,
                                           early)
        except BaseException:
            _abandon(level_task, *early)  # whatever failed is the error reported
            raise

    async def _photo_views(self, query: SearchQuery, gen: Generation, ports: SearchPorts, policy: str, method: str,
                           want_regions: bool, want_local: bool, level_task: asyncio.Future,
                           early: list[asyncio.Future]) -> SearchResult:
        def embed(boxes: list[Box | None]) -> Awaitable[EmbedAnswer]:
            # Queries are embedded by the model version that made the catalog's vectors, whatever
            # the embedding service serves by default: a model change never compares two versions.
            return ports.embed(EmbedCall(query.image, boxes, gen.model_version, want_regions))

        detections: list[Detection] = []
        full_task = None
        rows = search.first_rows(query.top_k, self.cfg.rerank_candidates)
        if policy == "full" and not query.per_object:
            try:
                w, h = await asyncio.to_thread(imaging.image_size, query.image)
            except imaging.ImageError as exc:
                raise InvalidArgument(f"query image: {exc}") from None
            full = (0.0, 0.0, float(w), float(h))
        else:
            if policy == "both":
                # The full frame is searched whatever the detector finds: it is embedded while the
                # detector runs (two services, two cores) instead of after it, and (early_full_frame_search)
                # its first rows are asked for as soon as its vector is back, while the box's forward runs.
                full_task = asyncio.ensure_future(embed([None]))
                if self.cfg.early_full_frame_search:
                    rows_task = self._full_rows(full_task, level_task, gen, rows, query.filters)
                    early.append(asyncio.ensure_future(rows_task))
            try:
                det = await ports.detect(query.image, MAX_QUERY_OBJECTS)
            except BaseException:
                _abandon(full_task)  # the detection error is the one reported
                raise
            full = (0.0, 0.0, float(det.width), float(det.height))
            detections = list(det.detections)
        # The views of the query searched: the best box, the full frame, or both ("both").
        views = search.query_views(policy, [d.box for d in detections], full)
        objects = [d.box for d in detections] if query.per_object else []
        wanted = views + objects
        # "both": the full frame (embedded while the detector ran) is the last view.
        full_at = len(views) - 1 if full_task is not None and views[-1] == full else None
        boxes = [None if box == full else box for i, box in enumerate(wanted) if i != full_at]
        # The boxes' call goes out as soon as the detector has answered, while the full frame's may
        # still be running. The query's local features (the full frame's when it is searched, else
        # the lead view's) are extracted beside the boxes' forward, on the core it leaves idle, not
        # beside the detector and the full frame's forward, which already take both.
        box_task = asyncio.ensure_future(embed(boxes)) if boxes else None
        local_box = full if full in wanted else wanted[0]
        local_task = (asyncio.ensure_future(ports.local(LocalCall(query.image, None if local_box == full else local_box,
                                                                   gen.model_version)))
                      if want_local else None)
        calls = [t for t in (full_task, box_task, local_task) if t is not None]
        try:
            await asyncio.gather(*calls)  # the first error fails the search at once
        except BaseException:
            _abandon(*calls)
            raise
        answers = [t.result() for t in (full_task, box_task) if t is not None]
        features = local_task.result() if local_task is not None else b""
        for a in answers:
            self.store.check_model(gen, a.meta)  # a Generation: compared, nothing read
        model = answers[0].model
        rest = iter(answers[-1].embeddings if boxes else [])
        embs = [answers[0].embeddings[0] if i == full_at else next(rest) for i in range(len(wanted))]
        local = QueryLocal()
        if want_local:
            local = QueryLocal(features, local_box[2] - local_box[0], local_box[3] - local_box[1], query.correspondences)
        args = (gen, await level_task, method, want_regions, query.top_k, dict(query.filters), local, ports)

        # The view whose best match is closest leads (its vector and regions go to re-ranking);
        # every item keeps its best object over all views.
        lead, (hits, used) = await self._ranked(embs[:len(views)],
                                                search.view_margins(views, full, self.cfg.query_crop_margin), *args,
                                                early={full_at: early[0]} if early else None)
        per_object = await asyncio.gather(*(self._ranked([e], [0.0], *args) for e in embs[len(views):]))
        return SearchResult(hits=hits, query_box=views[lead], method=used, model=model,
                            objects=[ObjectResult(d, obj_hits)
                                     for d, (_, (obj_hits, _)) in zip(detections, per_object, strict=False)])

    async def _full_rows(self, full_task: asyncio.Future, level_task: asyncio.Future, gen: Generation, rows: int,
                         filters) -> list[StoredObject]:
        """The full frame's first `rows` rows: what `_ranked`'s first search would find for it."""
        answer = await full_task
        self.store.check_model(gen, answer.meta)  # never a search with another model's vector
        found = await asyncio.to_thread(self.store.search_many, gen, [answer.embeddings[0].values], rows,
                                        dict(filters), level=await level_task)
        return found[0]

    async def _similar(self, query: SearchQuery, gen: Generation, ports: SearchPorts, policy: str, method: str,
                       want_local: bool) -> SearchResult:
        """A search with a stored item as the query ("more like this"): its stored vectors as the views
        a query photo would give (its largest object, the full frame under the default ingest policy,
        and by the query policy its best detected object), its stored local features for "verify",
        the item itself left out."""
        level = await asyncio.to_thread(self.store.read_level, gen)
        objs = await asyncio.to_thread(self.store.get_item, gen, query.item_id)

        def area(o) -> float:
            return (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])

        full = max(objs, key=area)
        by_box = {o.box: o for o in reversed(objs)}  # a box stored twice: its first object
        views = search.query_views(policy, [o.box for o in objs if o is not full], full.box)
        ids = [by_box[v].object_id for v in views]
        vectors = await asyncio.to_thread(self.store.get_vectors, gen, ids, level)
        if len(vectors) < len(set(ids)):
            raise NotFound(f"item {query.item_id!r} changed while it was read: try again")
        embs = [Embedded(values=vectors[i].tolist()) for i in ids]
        local = QueryLocal()
        if want_local:
            stored = await asyncio.to_thread(self.store.get_local, gen, [full.object_id])
            w, h = full.box[2] - full.box[0], full.box[3] - full.box[1]
            local = QueryLocal(stored.get(full.object_id, b""), w, h, query.correspondences)
        args = (gen, level, method, False, query.top_k, dict(query.filters), local, ports)
        lead, (hits, used) = await self._ranked(embs, search.view_margins(views, full.box, self.cfg.query_crop_margin),
                                                *args, exclude=query.item_id)
        return SearchResult(hits=hits, query_box=views[lead], method=used)

    async def _ranked(self, embs: list[Embedded], margins, gen: Generation, level: str, method: str,
                      want_regions: bool, top_k: int, filters: dict[str, str], local: QueryLocal, ports: SearchPorts,
                      exclude: str = "", early: dict[int, Awaitable[list[StoredObject]]] | None = None
                      ) -> tuple[int, tuple[list[Hit], str]]:
        """Search the store with each query vector, keep each item's best object, re-rank with the
        lead vector (the one whose best match scored highest): (lead index, (hits, method used)).
        `exclude`: an item left out (the query itself, in a search by item). `early`: view index ->
        that view's first rows, asked for already (the same rows, level and filters)."""
        # An item may be stored as several objects: ask for more rows than items wanted, and
        # more again only while the rows hold fewer items than the answer needs (top_k): a
        # shorter candidate list for re-ranking costs less than a second search at 4x the rows.
        rows = search.first_rows(top_k, self.cfg.rerank_candidates)
        early = early or {}
        while True:
            rest = [i for i in range(len(embs)) if i not in early]
            found_rest = iter(await asyncio.to_thread(self.store.search_many, gen, [embs[i].values for i in rest],
                                                      rows, filters, level=level) if rest else [])
            found = [await early[i] if i in early else next(found_rest) for i in range(len(embs))]
            early = {}  # a second round asks for every view's rows
            results = [[r for r in view if r.item_id != exclude] for view in found] if exclude else found
            best = search.best_per_item(results, margins, self.cfg.catalog_crop_margin)
            left = ports.time_left()
            if search.enough_rows(best, found, rows, top_k) or (left is not None and left < 1.0):
                break
            rows = search.more_rows(rows)
        chosen = search.candidates(best, top_k, self.cfg.rerank_candidates)
        objects = {o.item_id: o for _, o in chosen}
        lead = search.lead_view(results)
        query_region = list(embs[lead].regions_query) if want_regions else []
        rr = await ports.rerank(RerankCall(gen=gen, level=level, vector=list(embs[lead].values), candidates=chosen,
                                           method=method, top_k=top_k, query_region=query_region, local=local))
        hits = [Hit(h.item_id, h.score, objects[h.item_id], h.detail) for h in rr.hits]
        return lead, (hits, rr.method)
