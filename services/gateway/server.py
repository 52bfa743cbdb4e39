"""Search gateway: the API internal apps call. Composes detection, embedding,
the vector store and re-ranking for search; queues ingestion for the workers."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import stat
import time
from pathlib import Path

import grpc
from PIL import Image

from services.gateway.coalesce import BatchCalls
from visearch import adapting, backup, convert, duplicates, files, imaging, local, search
from visearch import observability as obs
from visearch.audit import audit_interceptor
from visearch.auth import PermissionDenied, readable, require, visible
from visearch.catalogs import Catalogs
from visearch.common.v1 import common_pb2
from visearch.detection.v1 import detection_pb2, detection_pb2_grpc
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VisearchError,
    to_status,
)
from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from visearch.grpcserver import (
    Service,
    aio_channel,
    authenticator,
    channel_ready,
    remaining,
    rpc,
    rpc_stream,
    serve,
    split_by_bytes,
)
from visearch.jobs import Jobs, check_job_id, new_job_id
from visearch.queue import ADAPT_TASK, INGEST_QUEUE, INGEST_TASK, REEMBED_PLAN_TASK, make_celery
from visearch.quota import rate_interceptor
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from visearch.searching import (
    Detected,
    EmbedAnswer,
    EmbedCall,
    LocalCall,
    Ranked,
    RerankCall,
    Reranked,
    SearchConfig,
    SearchPipeline,
    SearchPorts,
    SearchQuery,
)
from visearch.settings import GatewaySettings
from visearch.store import (
    BOUNDED,
    SOURCE_MAX,
    VectorStore,
    WriteClock,
    check_catalog,
    check_filters,
    check_index,
    check_item_id,
    check_metadata,
    check_regions,
    check_storage,
)

log = logging.getLogger(__name__)
MAX_TOP_K = 1000
DUPLICATE_MODES = ("", "off", "report", "skip")  # IngestItemsRequest.duplicates
MAX_ERROR_MESSAGE = 4096
# The batch of searches the current task belongs to (BatchSearch), whose model calls are merged.
_BATCH: contextvars.ContextVar[BatchCalls | None] = contextvars.ContextVar("visearch_batch_search", default=None)
MAX_DELETE = 1000  # item ids per DeleteItems


class DependencyError(VisearchError):
    """A downstream call failed; carries that call's status, named by service."""

    def __init__(self, dependency: str, exc: grpc.RpcError):
        code, message = to_status(exc, dependency)
        super().__init__(message)
        self.code = code


async def call(dependency: str, coro):
    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise DependencyError(dependency, exc) from None


def item_image(data: bytes, max_side: int) -> gateway_pb2.GetItemImageResponse:
    """The bytes as stored, or scaled down to max_side as JPEG (EXIF orientation applied, as boxes are)."""
    try:
        img = imaging.decode_image(data, draft_size=max_side or None)
        w, h = imaging.image_size(data)
    except imaging.ImageError as exc:
        raise FailedPrecondition(f"the stored image cannot be decoded: {exc}") from None
    if not max_side:
        kind = Image.open(io.BytesIO(data)).format or "JPEG"
        return gateway_pb2.GetItemImageResponse(image=data, content_type=f"image/{kind.lower()}", width=w, height=h,
                                                sent_width=w, sent_height=h)
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return gateway_pb2.GetItemImageResponse(image=out.getvalue(), content_type="image/jpeg", width=w, height=h,
                                            sent_width=img.width, sent_height=img.height)


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, settings: GatewaySettings):
        self.s = settings
        self.auth = authenticator(settings)
        self.channels = {
            name: aio_channel(addr, settings, max_message_bytes=settings.max_message_bytes)
            for name, addr in (("detection", settings.detection_addr), ("embedding", settings.embedding_addr),
                               ("rerank", settings.rerank_addr))
        }
        self.detection = detection_pb2_grpc.DetectionServiceStub(self.channels["detection"])
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(self.channels["embedding"])
        self.rerank = rerank_pb2_grpc.RerankServiceStub(self.channels["rerank"])
        self.jobs = Jobs.from_url(settings.redis_url, settings.job_ttl_seconds)
        self.store = VectorStore(settings, WriteClock(self.jobs.r))
        self.catalogs = Catalogs(self.store, self.jobs, settings.job_ttl_seconds)
        self.pipeline = SearchPipeline(self.store, SearchConfig.of(settings))
        self.celery = make_celery(settings)
        self.roots = [Path(r).resolve() for r in settings.ingest_roots]
        self._stats_at = 0.0
        self._scanning = asyncio.Lock()  # FindDuplicates
        self._policy_checked = False

    # ---- search ---------------------------------------------------------------
    @rpc()
    async def Search(self, request, context):
        return await self._search(request, context)

    @rpc()
    async def BatchSearch(self, request, context):
        """Every search of the request at once, through the same steps as Search, their Detect and
        Embed calls merged into batched forwards (services/gateway/coalesce.py); each search
        answers its response or its own error, in order."""
        n = len(request.searches)
        if not 0 < n <= search.MAX_BATCH_SEARCHES:
            raise InvalidArgument(f"{n} searches in one BatchSearch; 1 to {search.MAX_BATCH_SEARCHES} are answered")
        batch = BatchCalls(self.detection, self.embedding, n, split_by_bytes)
        token = _BATCH.set(batch)

        async def one(s):
            try:
                return await self._search(s, context)
            finally:  # its batch-mates stop waiting for its calls
                batch.finished()

        try:
            outcomes = await asyncio.gather(*(one(s) for s in request.searches), return_exceptions=True)
        finally:
            _BATCH.reset(token)
        results = []
        for out in outcomes:
            if isinstance(out, BaseException):
                if isinstance(out, asyncio.CancelledError):
                    raise out
                code, message = to_status(out, getattr(out, "dependency", None))
                if code == grpc.StatusCode.INTERNAL:
                    log.error("unexpected error in a batched search", exc_info=out)
                results.append(gateway_pb2.BatchSearchResult(error=gateway_pb2.SearchError(
                    code=code.name, message=message[:MAX_ERROR_MESSAGE])))
            else:
                results.append(gateway_pb2.BatchSearchResult(response=out))
        return gateway_pb2.BatchSearchResponse(results=results)

    def _detect_call(self, req, timeout: float):
        batch = _BATCH.get()
        return batch.detect(req, timeout) if batch is not None else self.detection.Detect(req, timeout=timeout)

    def _embed_call(self, req, timeout: float):
        batch = _BATCH.get()
        return batch.embed(req, timeout) if batch is not None else self.embedding.Embed(req, timeout=timeout)

    def _local_call(self, req, timeout: float):
        batch = _BATCH.get()
        return batch.extract_local(req, timeout) if batch is not None else self.embedding.ExtractLocal(req, timeout=timeout)

    async def _search(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("search", catalog)
        top_k = request.top_k or 10
        if not 0 < top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if request.item_id:
            if request.image:
                raise InvalidArgument("a search is by image or by item_id, not both")
            check_item_id(request.item_id)
            if request.per_object:
                raise InvalidArgument("per_object needs a query image: a search by item_id has no detections")
        elif not request.image:
            raise InvalidArgument("no query image: the image field is empty")
        elif _BATCH.get() is not None:
            # In a batch, an image whose header does not read fails here, alone, before its calls are
            # merged with the others' (a merged call that fails is made again one by one).
            try:
                imaging.image_size(request.image)
            except imaging.ImageError as exc:
                raise InvalidArgument(f"query image: {exc}") from None
        if len(request.image) > imaging.DEFAULT_LIMITS.max_bytes:
            raise InvalidArgument(f"query image is {len(request.image)} bytes, over the limit of "
                                  f"{imaging.DEFAULT_LIMITS.max_bytes} bytes")
        check_filters(dict(request.filters))
        # The catalog's live generation, resolved once: every read of this search (vectors,
        # regions) and the query's model version come from it, even if a re-embedding switches
        # the catalog meanwhile.
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        query = SearchQuery(image=request.image, item_id=request.item_id, top_k=top_k, filters=dict(request.filters),
                            full_frame=request.full_frame, per_object=request.per_object, rerank=request.rerank,
                            correspondences=request.correspondences)
        result = await self.pipeline.search(query, gen, self._ports(context))
        model = result.model if result.model is not None else convert.model_info_of_tag(gen.model_tag, gen.dim)
        return convert.search_response(result, model)

    def _ports(self, context) -> SearchPorts:
        """The search pipeline's remote steps over this gateway's stubs, within the caller's deadline."""
        t = self.s.rpc_timeout_seconds

        async def detect(image: bytes, max_detections: int) -> Detected:
            det = await call("detection", self._detect_call(
                detection_pb2.DetectRequest(images=[image], max_detections=max_detections), remaining(context, t)))
            return convert.detected_of(det.results[0])

        async def embed(c: EmbedCall) -> EmbedAnswer:
            items = []
            for box in c.boxes:
                item = embedding_pb2.EmbedItem(image=c.image)
                if box is not None:
                    item.box.CopyFrom(convert.pb_box(box))
                items.append(item)
            # Each item carries the query's bytes: several objects of a large photo go as several calls.
            parts = await asyncio.gather(*(call("embedding", self._embed_call(
                embedding_pb2.EmbedRequest(items=part, regions=c.regions, model_version=c.model_version),
                remaining(context, t))) for part in split_by_bytes(items, lambda it: len(it.image))))
            if len(parts) == 1:
                merged = parts[0]
            else:
                merged = embedding_pb2.EmbedResponse()
                merged.model.CopyFrom(parts[0].model)
                for p in parts:
                    merged.embeddings.extend(p.embeddings)
            return EmbedAnswer([convert.embedded_of(e) for e in merged.embeddings], convert.model_meta(merged.model),
                               merged.model)

        async def extract_local(c: LocalCall) -> bytes:
            item = embedding_pb2.EmbedItem(image=c.image)
            if c.box is not None:
                item.box.CopyFrom(convert.pb_box(c.box))
            got = await call("embedding", self._local_call(
                embedding_pb2.ExtractLocalRequest(items=[item], local_limit=local.QUERY_FEATURES,
                                                  local_max_side=local.QUERY_SIDE, model_version=c.model_version),
                remaining(context, t)))
            return got.local_features[0]

        async def rerank(c: RerankCall) -> Reranked:
            candidates = [rerank_pb2.Candidate(item_id=o.item_id, object_id=o.object_id, score=s,
                                               box=convert.pb_box(o.box)) for s, o in c.candidates]
            rr = await call("rerank", self.rerank.Rerank(
                rerank_pb2.RerankRequest(catalog=c.gen.catalog, query_embedding=c.vector, candidates=candidates,
                                         method=c.method, top_k=c.top_k, query_region=c.query_region,
                                         generation=c.gen.number, consistency=c.level, query_local=c.local.features,
                                         correspondences=c.local.correspondences, query_width=round(c.local.width),
                                         query_height=round(c.local.height)),
                timeout=remaining(context, t)))
            return Reranked([Ranked(h.item_id, h.score, h) for h in rr.hits], rr.method)

        return SearchPorts(detect=detect, embed=embed, rerank=rerank, local=extract_local, time_left=context.time_remaining)

    # ---- ingestion ------------------------------------------------------------
    def _check_path(self, uri: str) -> str:
        """The resolved path of an item's file, or INVALID_ARGUMENT saying why it cannot be ingested:
        inside the ingest roots, a regular file (not a FIFO, device or folder), within the size limit."""
        shown = uri if len(uri) <= 200 else uri[:100] + "..." + uri[-60:]
        if "://" in uri and not uri.startswith("file://"):
            raise InvalidArgument(f"uri {shown!r}: only local paths and file:// URIs are accepted")
        path = Path(uri.removeprefix("file://"))
        if not path.is_absolute():
            raise InvalidArgument(f"path {shown!r} must be absolute")
        try:
            real = path.resolve()  # RuntimeError: a loop of symlinks (Python 3.11)
            if not any(real.is_relative_to(root) for root in self.roots):
                raise InvalidArgument(f"path {shown!r} is outside the gateway's ingest roots"
                                      + ("" if self.roots else " (none configured: send image bytes instead)"))
            st = real.stat()
        except (OSError, ValueError, RuntimeError) as exc:  # too long, a loop of links, permission, missing, NUL
            raise InvalidArgument(f"path {shown!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"path {shown!r} is not a regular file")
        if st.st_size > imaging.DEFAULT_LIMITS.max_bytes:
            raise InvalidArgument(f"path {shown!r} is {st.st_size} bytes, over the limit of "
                                  f"{imaging.DEFAULT_LIMITS.max_bytes} bytes")
        if len(str(real).encode()) > SOURCE_MAX:
            raise InvalidArgument(f"path {shown!r} is longer than {SOURCE_MAX} bytes")
        return str(real)

    def _submit(self, job_id: str, catalog: str, tasks: list[dict], blobs: dict[str, bytes], headers: dict) -> None:
        """Record the items as pending (staging their bytes), then queue their tasks; run to its end in
        one thread. Bytes that would fill Redis are refused before anything is written (Redis runs
        with noeviction: the queue itself is never evicted); a batch the broker refuses fails its items."""
        staged = sum(len(b) for b in blobs.values()) + 2 * len(json.dumps(tasks))  # bytes, and the tasks queued
        self.jobs.check_room(staged)
        # Recorded before any task exists, so a fast worker can never finish an item the job does not know yet.
        seqs = self.jobs.submit(job_id, catalog, [t["item_id"] for t in tasks], blobs)
        for t in tasks:  # this submission's number: only the job's latest submission of an item counts
            t["seq"] = seqs[t["item_id"]]
        batch = self.s.ingest_batch
        for start in range(0, len(tasks), batch):
            try:
                self.celery.send_task(INGEST_TASK, args=[job_id, catalog, tasks[start:start + batch]], headers=headers)
            except Exception as exc:  # the broker refused: these items fail with the reason, never stay pending
                rest = tasks[start:]
                reason = f"could not be queued: {type(exc).__name__}: {exc}"
                self.jobs.mark_failed(job_id, {t["item_id"]: reason for t in rest}, {t["item_id"]: t["seq"] for t in rest})
                raise Unavailable(f"the queue refused {len(rest)} of {len(tasks)} items ({exc}); they are marked "
                                  f"failed in job {job_id}: send them again") from None

    @rpc()
    async def IngestItems(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("ingest", catalog)
        if not request.items:
            raise InvalidArgument("no items to ingest")
        if len(request.items) > self.s.max_items_per_request:
            raise InvalidArgument(f"{len(request.items)} items in one request; the limit is "
                                  f"{self.s.max_items_per_request}: send several requests with the same job_id")
        if request.job_id:
            check_job_id(request.job_id)
        if request.duplicates not in DUPLICATE_MODES:
            raise InvalidArgument(f"duplicates {request.duplicates[:40]!r}: expected one of off, report, skip")
        tasks, blobs, seen = [], {}, set()
        limit = imaging.DEFAULT_LIMITS.max_bytes
        for it in request.items:
            check_item_id(it.item_id)
            if it.item_id in seen:
                raise InvalidArgument(f"item id {it.item_id[:80]!r} appears twice in one request")
            seen.add(it.item_id)
            entry = {"item_id": it.item_id, "metadata": check_metadata(dict(it.metadata), it.item_id)}
            if request.duplicates in ("report", "skip"):
                entry["duplicates"] = request.duplicates
            which = it.WhichOneof("source")
            if which == "uri":
                entry["uri"] = await asyncio.to_thread(self._check_path, it.uri)
            elif which == "image" and it.image:
                if len(it.image) > limit:
                    raise InvalidArgument(f"item {it.item_id[:80]!r}: image of {len(it.image)} bytes, over the "
                                          f"limit of {limit} bytes")
                blobs[it.item_id] = it.image
            else:
                raise InvalidArgument(f"item {it.item_id[:80]!r} has neither image bytes nor a uri")
            tasks.append(entry)
        job_id = request.job_id or new_job_id()
        region_mode = check_regions(request.storage.regions) if request.storage.regions else ""
        index_kind = check_index(request.storage.index) if request.storage.index else ""
        # The catalog exists from the first ingest request on, made for the serving model and the
        # storage asked for; an existing catalog keeps its model version (the workers embed with it)
        # and its storage.
        live = await asyncio.to_thread(self.store.live, catalog)
        if live is None:
            info = await call("embedding", self.embedding.GetModelInfo(
                embedding_pb2.GetModelInfoRequest(), timeout=remaining(context, self.s.rpc_timeout_seconds)))
            await self.check_model(info.model)
            await asyncio.to_thread(self.catalogs.ensure, catalog, convert.model_meta(info.model), region_mode,
                                    index_kind)
        else:
            check_storage(live, region_mode, index_kind)
        headers = {"request_id": obs.request_id.get()}
        # One thread does the rest to its end even if the caller goes away meanwhile (a deadline, a
        # cancel): items recorded as pending are always queued, or failed with the reason.
        await asyncio.to_thread(self._submit, job_id, catalog, tasks, blobs, headers)
        log.info("ingest queued", extra={"job_id": job_id, "catalog": catalog, "items": len(tasks)})
        return gateway_pb2.IngestItemsResponse(job_id=job_id, accepted=len(tasks))

    @rpc()
    async def GetIngestJob(self, request, context):
        check_job_id(request.job_id)
        st = await asyncio.to_thread(self.jobs.status, request.job_id)
        if not readable(st.catalog):
            # Not "belongs to catalog X": a caller learns nothing of catalogs it may not read.
            raise PermissionDenied(f"this key may not read ingest job {request.job_id[:64]!r}")
        return gateway_pb2.GetIngestJobResponse(job=convert.job_pb(st))

    @rpc()
    async def ListIngestJobs(self, request, context):
        limit = request.limit or 20
        if not 0 < limit <= 200:
            raise InvalidArgument(f"limit must be between 1 and 200, got {limit}")
        if request.catalog:
            require("read", check_catalog(request.catalog))
        wanted = (lambda c: c == request.catalog) if request.catalog else readable
        found = await asyncio.to_thread(self.jobs.recent, limit, wanted)
        return gateway_pb2.ListIngestJobsResponse(jobs=[convert.job_pb(st) for st in found])

    @rpc()
    async def GetItemImage(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("read", catalog)
        if not 0 <= request.max_side <= 4096:
            raise InvalidArgument(f"max_side must be between 0 and 4096, got {request.max_side}")
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        objs = await asyncio.to_thread(self.store.get_item, gen, check_item_id(request.item_id))
        return await asyncio.to_thread(self._item_image, request.item_id, objs[0].source, request.max_side)

    def _item_image(self, item_id: str, source: str, max_side: int) -> gateway_pb2.GetItemImageResponse:
        return item_image(self._source_bytes(item_id, source), max_side)

    def _source_bytes(self, item_id: str, source: str) -> bytes:
        """Read an item's image from its source, only inside the ingest roots or the blob store."""
        allowed = [*self.roots, *([Path(self.s.blob_dir).resolve()] if self.s.blob_dir else [])]
        try:
            path = Path(source).resolve() if source else None
        except (OSError, ValueError, RuntimeError):
            path = None
        if path is None or not any(path.is_relative_to(r) for r in allowed):
            raise NotFound(f"the image of item {item_id!r} is not kept where this gateway can read it")
        try:
            return files.read_file(path, within=allowed)
        except files.ReadError as exc:
            raise FailedPrecondition(f"the stored image of item {item_id!r} cannot be read: {exc}") from None

    @rpc()
    async def FindDuplicates(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("read", catalog)
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        if self._scanning.locked():  # a whole-catalog scan: one at a time per gateway, so searches keep threads
            raise ResourceExhausted("this gateway is already looking for duplicates: try again when it is done")

        def read(source: str) -> bytes | None:
            try:
                return self._source_bytes("", source)
            except (NotFound, FailedPrecondition):
                return None

        async with self._scanning:
            scan = await asyncio.to_thread(duplicates.find, self.store, gen, read)
        out = [gateway_pb2.DuplicateGroup(item_ids=g, min_ncc=n) for g, n in zip(scan.groups, scan.min_ncc, strict=True)]
        log.info("duplicates found", extra={"catalog": catalog, "groups": len(out), "items": scan.items,
                                            "pairs": scan.pairs_checked})
        return gateway_pb2.FindDuplicatesResponse(groups=out, items=scan.items, pairs_checked=scan.pairs_checked,
                                                  unreadable=scan.unreadable)

    # ---- items and catalogs ---------------------------------------------------
    @rpc()
    async def DeleteItems(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("delete", catalog)
        ids = [check_item_id(i) for i in request.item_ids]
        if not ids:
            raise InvalidArgument("no item ids to delete")
        if len(ids) > MAX_DELETE:  # each id is up to 32 primary-key lookups per generation
            raise InvalidArgument(f"{len(ids)} item ids in one request; the limit is {MAX_DELETE}")
        live = await asyncio.to_thread(self.store.resolve, catalog)
        # From every generation: the one being built must not keep it, and neither may the
        # previous one, whose late writes are carried over when it is retired.
        n = 0
        for gen in await asyncio.to_thread(self.store.generations, catalog):
            deleted = await asyncio.to_thread(self.store.delete_items, gen, ids)
            n = deleted if gen.number == live.number else n
        return gateway_pb2.DeleteItemsResponse(deleted=n)

    @rpc()
    async def GetItem(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("read", catalog)
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        objs = await asyncio.to_thread(self.store.get_item, gen, check_item_id(request.item_id))
        return gateway_pb2.GetItemResponse(item=convert.item_pb(request.item_id, catalog, gen.model_tag, objs))

    @rpc()
    async def ListItems(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("read", catalog)
        after = VectorStore.page_after(request.page_token)
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        # The page size is checked by the store (1 to store.MAX_PAGE); 0 is the default.
        page, nxt = await asyncio.to_thread(self.store.list_items, gen, after, request.page_size or 50)
        total = await asyncio.to_thread(self.store.count, gen, BOUNDED)
        items = [convert.item_pb(i, catalog, gen.model_tag, objs) for i, objs in page]
        return gateway_pb2.ListItemsResponse(items=items, next_page_token=VectorStore.page_token(nxt),
                                             total_items=total)

    @rpc()
    async def ListCatalogs(self, request, context):
        cats = await asyncio.to_thread(self.store.list_catalogs, footprint=True)
        out = []
        for c in cats:
            if not visible(c.name):
                continue
            cat = gateway_pb2.Catalog(name=c.name, objects=c.objects, generation=c.generation,
                                      model=convert.model_info_of_tag(c.model_tag, c.dim),
                                      storage=gateway_pb2.CatalogStorage(regions=c.regions, index=c.index),
                                      memory_bytes_per_object=c.footprint.memory,
                                      bytes_per_object=c.footprint.total)
            if c.building:
                cat.building_generation = c.building.number
                cat.building_objects = c.building_objects
                cat.building_model.CopyFrom(convert.model_info_of_tag(c.building.model_tag, c.building.dim))
            out.append(cat)
        return gateway_pb2.ListCatalogsResponse(catalogs=out)

    @rpc()
    async def ReembedCatalog(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("admin", catalog)
        if request.model_version and not (request.model_version.isascii() and request.model_version.isdigit()
                                          and len(request.model_version) <= 9):
            raise InvalidArgument(f"model_version {request.model_version!r} must be a number (empty: the default)")
        live = await asyncio.to_thread(self.store.resolve, catalog)
        info = (await call("embedding", self.embedding.GetModelInfo(
            embedding_pb2.GetModelInfoRequest(model_version=request.model_version),
            timeout=remaining(context, self.s.rpc_timeout_seconds)))).model
        if not request.model_version:
            await self.check_model(info)
        meta = convert.model_meta(info)
        if meta.tag == live.model_tag:
            raise FailedPrecondition(f"catalog {catalog!r} is already embedded by {meta.tag} (generation {live.number})")
        # The rest runs to its end in one thread even if the caller goes away (a deadline, a cancel):
        # a job recorded is always queued, never left "planning" with nothing to plan it.
        headers = {"request_id": obs.request_id.get()}

        def queue(job_id: str, number: int) -> None:
            self.celery.send_task(REEMBED_PLAN_TASK, args=[job_id, catalog, number], headers=headers)

        job_id, number = await asyncio.to_thread(self.catalogs.start_reembed, catalog, live, meta, queue)
        return gateway_pb2.ReembedCatalogResponse(job_id=job_id, generation=number, model=info)

    @rpc()
    async def AdaptCatalog(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("admin", catalog)
        views = request.views or adapting.DEFAULT_VIEWS
        max_objects = request.max_objects or adapting.DEFAULT_MAX_OBJECTS
        if not 1 <= views <= adapting.MAX_VIEWS:
            raise InvalidArgument(f"views {views}: 1 to {adapting.MAX_VIEWS} made-up views per object")
        if not 2 <= max_objects <= adapting.MAX_OBJECTS:
            raise InvalidArgument(f"max_objects {max_objects}: 2 to {adapting.MAX_OBJECTS} objects")
        await asyncio.to_thread(self.store.resolve, catalog)  # NotFound for a catalog that does not exist
        job_id = new_job_id()
        headers = {"request_id": obs.request_id.get()}

        def start() -> None:  # recorded, then queued, in one thread even if the caller goes away
            self.jobs.create(job_id, catalog, "adapt", "queued", views=views, max_objects=max_objects)
            try:
                self.celery.send_task(ADAPT_TASK, args=[job_id, catalog, views, max_objects], headers=headers)
            except Exception as exc:
                self.jobs.set_phase(job_id, "failed", f"could not be queued: {exc}", close=True)
                raise Unavailable(f"the queue refused the adaptation ({exc}): try again") from None

        await asyncio.to_thread(start)
        log.info("adaptation queued", extra={"job_id": job_id, "catalog": catalog, "views": views,
                                             "max_objects": max_objects})
        return gateway_pb2.AdaptCatalogResponse(job_id=job_id)

    # ---- backup and restore ----------------------------------------------------
    @rpc_stream
    async def ExportCatalog(self, request, context):
        catalog = check_catalog(request.catalog or "default")
        require("admin", catalog)
        size = request.batch_size or backup.DEFAULT_BATCH
        if not 0 < size <= backup.MAX_BATCH:
            raise InvalidArgument(f"batch_size {size}: 1 to {backup.MAX_BATCH} objects per record")
        gen = await asyncio.to_thread(self.store.resolve, catalog)
        model = await self._model_of(gen)
        objects = await asyncio.to_thread(self.store.count, gen)
        yield gateway_pb2.CatalogRecord(header=gateway_pb2.CatalogHeader(
            catalog=catalog, model=model, storage=gateway_pb2.CatalogStorage(regions=gen.regions, index=gen.index),
            objects=objects,
            generation=gen.number, exported_at=time.time(), format=backup.FORMAT))
        # A plain generator stepped in worker threads: it holds no cursor or file, so a cancelled
        # export simply stops stepping it (closing it while a step runs would raise in that thread).
        rows = self.store.export_rows(gen, size)
        sent, items = 0, set()
        while batch := await asyncio.to_thread(next, rows, None):
            sent += len(batch)
            items.update(r["item_id"] for r in batch)
            yield gateway_pb2.CatalogRecord(batch=gateway_pb2.ObjectBatch(objects=[backup.record_of(r) for r in batch]))
        yield gateway_pb2.CatalogRecord(trailer=gateway_pb2.CatalogTrailer(objects=sent, items=len(items)))
        log.info("catalog exported", extra={"catalog": catalog, "objects": sent, "generation": gen.number})

    async def _model_of(self, gen) -> common_pb2.ModelInfo:
        """The full record of the model that made a generation, when the embedding service still has it."""
        name, _, version = gen.model_tag.partition(":")
        try:
            info = (await self.embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(model_version=version),
                                                      timeout=self.s.rpc_timeout_seconds)).model
        except grpc.aio.AioRpcError:
            info = None
        if info is not None and info.name == name and info.dim == gen.dim:
            return info
        return convert.model_info_of_tag(gen.model_tag, gen.dim)

    @rpc()
    async def ImportCatalog(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("record") != "header":
            raise InvalidArgument("an import begins with the catalog header (ExportCatalog's first record)")
        head = first.header
        catalog = check_catalog(head.catalog)
        require("admin", catalog)
        if head.format != backup.FORMAT:
            raise InvalidArgument(f"records of format {head.format!r}; this gateway imports {backup.FORMAT!r}")
        want = head.model
        try:
            info = (await self.embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(model_version=want.version),
                                                      timeout=remaining(context, self.s.rpc_timeout_seconds))).model
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise FailedPrecondition(f"the catalog's vectors were made by {want.name}:{want.version}, which this "
                                         f"mesh's model repository does not hold: add that version, then restore "
                                         f"(re-embedding needs the images)") from None
            raise DependencyError("embedding", exc) from None
        if (info.name, info.dim) != (want.name, want.dim) or (
                want.weights_sha256 and info.weights_sha256 and want.weights_sha256 != info.weights_sha256):
            raise FailedPrecondition(f"version {want.version} here is {info.name} (dim {info.dim}, weights "
                                     f"{info.weights_sha256[:12]}), not the {want.name} (dim {want.dim}, weights "
                                     f"{want.weights_sha256[:12]}) that made the catalog's vectors")
        gen = await asyncio.to_thread(self.store.restore_generation, catalog, convert.model_meta(info),
                                      check_regions(head.storage.regions or "off"), head.storage.index)
        stored, items, trailer = 0, set(), None
        try:
            async for rec in request_iterator:
                kind = rec.WhichOneof("record")
                if kind == "batch" and trailer is None:
                    try:
                        rows = [backup.row_of(o) for o in rec.batch.objects]
                    except ValueError as exc:
                        raise InvalidArgument(str(exc)) from None
                    stored += await asyncio.to_thread(self.store.restore_rows, gen, rows)
                    items.update(r["item_id"] for r in rows)
                elif kind == "trailer" and trailer is None:
                    trailer = rec.trailer
                else:
                    raise InvalidArgument(f"a {kind} record where a batch or the one trailer was expected")
            if trailer is None or trailer.objects != stored:
                raise InvalidArgument(f"the import ended after {stored} objects without a trailer saying so: "
                                      "nothing restored")
            await asyncio.to_thread(self.store.go_live, gen)
        except BaseException:
            try:  # a restore is whole or absent; the original error is what the caller hears
                await asyncio.shield(asyncio.to_thread(self.store.drop_generation, gen))
            except Exception:  # noqa: BLE001 - e.g. Milvus down, which is often why the import failed
                log.exception("a failed restore's generation %s of %r was not dropped", gen.number, catalog)
            raise
        log.info("catalog restored", extra={"catalog": catalog, "objects": stored, "generation": gen.number})
        return gateway_pb2.ImportCatalogResponse(catalog=catalog, objects=stored, items=len(items),
                                                 generation=gen.number, model=info)

    # ---- lifecycle ------------------------------------------------------------
    async def check_model(self, info: common_pb2.ModelInfo) -> None:
        """Refuse to work with an embedding model other than the pinned one."""
        want = self.s.expected_model
        if want and f"{info.name}:{info.version}" != want:
            raise FailedPrecondition(f"the embedding service serves {info.name}:{info.version} (dim {info.dim}); "
                                     f"this gateway is pinned to {want} (VISEARCH_EXPECTED_MODEL)")

    async def ready(self) -> bool:
        deps = await asyncio.gather(*(channel_ready(ch) for ch in self.channels.values()))
        if not all(deps):
            return False
        if self.s.expected_model:
            try:
                info = await self.embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=5)
                await self.check_model(info.model)
            except (grpc.aio.AioRpcError, FailedPrecondition) as exc:
                log.error("not ready: %s", getattr(exc, "message", None) or exc)
                return False
        try:
            await asyncio.to_thread(self.jobs.ping)
            if not self._policy_checked:
                await asyncio.to_thread(self._check_redis_policy)
            await asyncio.to_thread(self.store.ping)
            await self._refresh_stats()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            log.warning("store or queue not ready: %s", exc)
            return False
        return True

    def _check_redis_policy(self) -> None:
        """Once: say so when Redis may evict keys (the queue and job records must never be evicted)."""
        self._policy_checked = True
        policy = self.jobs.eviction_policy()
        if policy is not None and policy != "noeviction":  # None: CONFIG disabled (managed Redis)
            log.error("Redis runs with maxmemory-policy %s: it may evict queued tasks and job records; "
                      "run it with maxmemory-policy noeviction", policy)

    async def _refresh_stats(self, every: float = 10.0) -> None:
        """Queue depth and index sizes for /metrics, at most every `every` seconds."""
        now = time.monotonic()
        if now - self._stats_at < every:
            return
        self._stats_at = now
        obs.QUEUE_DEPTH.set(await asyncio.to_thread(self.jobs.queue_depth, INGEST_QUEUE))
        # Bounded: a gauge may lag a few seconds, and a Strong count on a Milvus server waits for
        # its next time tick on every catalog, every 10 s, beside the searches.
        for c in await asyncio.to_thread(self.store.list_catalogs, BOUNDED):
            obs.INDEX_OBJECTS.labels(c.name).set(c.objects)

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        self.store.close()


async def main(settings: GatewaySettings, **kw) -> None:
    gateway = Gateway(settings)
    service = Service(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
                      gateway_pb2_grpc.add_GatewayServiceServicer_to_server, gateway)
    # After authentication, the audit trail, then the rate limit: what the limit refuses is audited too.
    policy = [i for i in (audit_interceptor(settings.audit_log, gateway.auth),
                          rate_interceptor(settings, settings.redis_url, gateway.auth)) if i is not None]
    await serve([service], settings, settings.gateway_port, ready=gateway.ready, on_stop=gateway.close,
                interceptors=policy, **kw)
