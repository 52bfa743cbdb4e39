"""The Python SDK of the visearch gateway, sync (`Client`) and asyncio (`AsyncClient`).

    from visearch.client import Client
    with Client.local() as vs:                      # or Client("gw-1:50050,gw-2:50050", api_key=...)
        job = vs.ingest_paths({"milk-1l": "/photos/milk.jpg"}, catalog="shop")
        vs.wait(job.job_id)
        print([(h.item_id, h.score) for h in vs.search("/photos/query.jpg", catalog="shop").hits])

Answers are the gateway's protobuf messages (`visearch.gateway.v1.gateway_pb2`, typed by its
.pyi stubs): SearchResponse, IngestItemsResponse, IngestJob, Item, Catalog, ReembedCatalogResponse.
Bulk helpers on top (CSV manifests, ingestion in requests of bounded size, answers as dicts): `visearch.sdk`.

- **Addresses**: one `host:port`, a gRPC target (`dns:///gateway:50050` resolves every address
  of a name and spreads calls round-robin), or several addresses (a list or comma-separated):
  the client keeps a channel to each and takes them in turn, moving to the next on UNAVAILABLE.
- **Deadlines**: every call has one (`timeout`, per client or per call), and it covers the
  retries too.
- **Retries**: every gateway call is idempotent (ingestion is keyed by item id and the client
  makes the job id, a re-embedding start returns the running job; a retried delete may report
  0 deleted), so UNAVAILABLE is retried with exponential backoff
  (`retries` attempts in all), on the next address first. A key over its rate (RESOURCE_EXHAUSTED
  with a `retry-after` trailer) waits what the gateway says and tries again, `max_rate_retries`
  times (3). Other codes are final and raised as
  `grpc.RpcError` with the gateway's reason (`exc.code()`, `exc.details()`).
- **Auth**: `api_key`, else VISEARCH_API_KEY; TLS from the VISEARCH_TLS_* settings (`security`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from visearch import backup, files
from visearch.channels import REQUEST_BUDGET, aio_channel, client_options, retry_after, split_by_bytes, sync_channel
from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from visearch.search import MAX_BATCH_SEARCHES

if TYPE_CHECKING:
    from visearch.clientsettings import SecuritySettings

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
ImageArg = bytes | str | Path


def split_addresses(addresses: str | Sequence[str]) -> list[str]:
    if isinstance(addresses, str):
        addresses = addresses.split(",") if not addresses.startswith(("ipv4:", "ipv6:")) else [addresses]
    out = [a.strip() for a in addresses if a.strip()]
    if not out:
        raise ValueError("no gateway address (pass one, or set VISEARCH_GATEWAY_ADDR)")
    return out


def image_bytes(image: ImageArg) -> bytes:
    """Encoded image bytes, or the bytes of the file at that path."""
    return image if isinstance(image, bytes) else files.read_file(image)


def _search_request(image: ImageArg, catalog: str, top_k: int, filters: Mapping[str, str] | None, rerank: str,
                    full_frame: bool, per_object: bool, correspondences: bool = False) -> gateway_pb2.SearchRequest:
    return gateway_pb2.SearchRequest(catalog=catalog, image=image_bytes(image), top_k=top_k, filters=filters or {},
                                     rerank=rerank, full_frame=full_frame, per_object=per_object,
                                     correspondences=correspondences)




def _batches(requests: list[gateway_pb2.SearchRequest]) -> list[list[gateway_pb2.SearchRequest]]:
    """BatchSearch requests of at most 64 searches and REQUEST_BUDGET bytes of images each."""
    out = []
    for part in split_by_bytes(requests, lambda r: len(r.image), REQUEST_BUDGET):
        out += [part[i:i + MAX_BATCH_SEARCHES] for i in range(0, len(part), MAX_BATCH_SEARCHES)]
    return out


def _similar_request(item_id: str, catalog: str, top_k: int, filters: Mapping[str, str] | None, rerank: str,
                     full_frame: bool, correspondences: bool) -> gateway_pb2.SearchRequest:
    return gateway_pb2.SearchRequest(catalog=catalog, item_id=item_id, top_k=top_k, filters=filters or {},
                                     rerank=rerank, full_frame=full_frame, correspondences=correspondences)


def _ingest_request(items: Iterable[gateway_pb2.IngestItem], catalog: str, job_id: str, regions: str = "",
                    duplicates: str = "", index: str = ""):
    # The job id is made here, not by the gateway, so that a retry after a lost answer adds to the
    # same job instead of starting a second one.
    return gateway_pb2.IngestItemsRequest(catalog=catalog, items=list(items), job_id=job_id or uuid.uuid4().hex,
                                          storage=gateway_pb2.CatalogStorage(regions=regions, index=index),
                                          duplicates=duplicates)


def path_items(paths: Mapping[str, str | Path], metadata: Mapping[str, Mapping[str, str]] | None = None,
               by_path: bool = False) -> list[gateway_pb2.IngestItem]:
    """IngestItems from {item id: image path}: the bytes are sent, or with by_path the path itself
    (the gateway must then be allowed to read it: VISEARCH_INGEST_ROOTS)."""
    md = metadata or {}
    if by_path:
        return [gateway_pb2.IngestItem(item_id=i, uri=str(Path(p).resolve()), metadata=md.get(i, {}))
                for i, p in paths.items()]
    return [gateway_pb2.IngestItem(item_id=i, image=files.read_file(p), metadata=md.get(i, {}))
            for i, p in paths.items()]


class _Base:
    def __init__(self, addresses: str | Sequence[str] | None, api_key: str | None, timeout: float, retries: int,
                 backoff: float, security: SecuritySettings | None, key: str | None, max_rate_retries: int = 3):
        self.addresses = split_addresses(addresses if addresses is not None else os.environ.get("VISEARCH_GATEWAY_ADDR", ""))
        self.address = self.addresses[0]
        self.api_key = api_key if api_key is not None else (key if key is not None else os.environ.get("VISEARCH_API_KEY", ""))
        self.timeout, self.retries, self.backoff = timeout, max(1, retries), backoff
        self.max_rate_retries = max(0, max_rate_retries)
        if security is None:
            # Read when a client is made, not when the SDK is imported (pydantic-settings).
            from visearch.clientsettings import SecuritySettings

            security = SecuritySettings()
        self.security = security
        self._turn = itertools.count()

    def _plan(self, timeout: float | None) -> tuple[float, int]:
        """(deadline, first address index) of one call."""
        return time.monotonic() + (timeout if timeout is not None else self.timeout), next(self._turn)

    def _retry_wait(self, exc: grpc.RpcError, attempt: int, deadline: float, throttled: int = 0) -> float | None:
        """Seconds to wait before attempt+1, or None when exc is final. `throttled`: how many of the
        answers so far were the key over its rate (they count against max_rate_retries, not retries)."""
        after = retry_after(exc)
        if after is not None:  # over the key's rate: the gateway said when a call will pass again
            if throttled >= self.max_rate_retries:
                return None
            return after if time.monotonic() + after < deadline else None
        attempt -= throttled
        if exc.code() not in RETRYABLE or attempt + 1 >= self.retries:
            return None
        # The next address at once; once each was tried, back off exponentially.
        wait = 0.0 if attempt + 1 < len(self.addresses) else min(2.0, self.backoff * 2 ** attempt)
        return wait if time.monotonic() + wait < deadline else None

    @classmethod
    def local(cls, data_dir: str | Path | None = None, **kw):
        """A client of the local mesh that `visearch up` started (its address and admin key)."""
        from visearch import meshfiles

        data_dir = Path(data_dir) if data_dir else meshfiles.default_data_dir()
        address = meshfiles.gateway_address(data_dir)
        if not address:
            raise RuntimeError(f"no mesh is up in {data_dir}: run `visearch up`")
        kw.setdefault("api_key", meshfiles.api_key(data_dir))
        return cls(address, **kw)


class Client(_Base):
    """Blocking client. Thread-safe; one per process is enough."""

    def __init__(self, addresses: str | Sequence[str] | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.2,
                 security: SecuritySettings | None = None, key: str | None = None, max_rate_retries: int = 3):
        super().__init__(addresses, api_key, timeout, retries, backoff, security, key, max_rate_retries)
        opts = client_options()
        self.channels = [sync_channel(a, self.security, key=self.api_key, options=opts) for a in self.addresses]
        self.stubs = [gateway_pb2_grpc.GatewayServiceStub(ch) for ch in self.channels]
        self.channel, self.stub = self.channels[0], self.stubs[0]

    def _call(self, method: str, request, timeout: float | None = None):
        deadline, first = self._plan(timeout)
        throttled = 0
        for attempt in itertools.count():
            stub = self.stubs[(first + attempt) % len(self.stubs)]
            try:
                return getattr(stub, method)(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as exc:
                wait = self._retry_wait(exc, attempt, deadline, throttled)
                if wait is None:
                    raise
                throttled += retry_after(exc) is not None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def search(self, image: ImageArg, catalog: str = "default", top_k: int = 10,
               filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
               per_object: bool = False, timeout: float | None = None, correspondences: bool = False
               ) -> gateway_pb2.SearchResponse:
        """Items showing the same object as the photo (bytes or a path), best first. Each hit's `match`
        says whether the system is confident it is the same object (the "verify" re-rank);
        `correspondences` also returns the verified local-feature correspondences of each hit."""
        return self._call("Search", _search_request(image, catalog, top_k, filters, rerank, full_frame, per_object,
                                                    correspondences), timeout)

    def search_many(self, images: Sequence[ImageArg], catalog: str = "default", top_k: int = 10,
                    filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
                    timeout: float | None = None) -> list[gateway_pb2.BatchSearchResult]:
        """Search with many photos at once (BatchSearch, 64 per call, forwards batched server-side):
        one result per photo, in order, each its `response` or its own `error` (code, message)."""
        reqs = [_search_request(img, catalog, top_k, filters, rerank, full_frame, False) for img in images]
        out: list[gateway_pb2.BatchSearchResult] = []
        for part in _batches(reqs):
            out += self._call("BatchSearch", gateway_pb2.BatchSearchRequest(searches=part), timeout).results
        return out

    def similar(self, item_id: str, catalog: str = "default", top_k: int = 10,
                filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
                timeout: float | None = None, correspondences: bool = False) -> gateway_pb2.SearchResponse:
        """"More like this": items like one already in the catalog, found with its stored vectors and
        local features (nothing uploaded or embedded again), the item itself left out."""
        return self._call("Search", _similar_request(item_id, catalog, top_k, filters, rerank, full_frame,
                                                     correspondences), timeout)

    def ingest(self, items: Iterable[gateway_pb2.IngestItem], catalog: str = "default", job_id: str = "",
               timeout: float | None = None, regions: str = "", duplicates: str = "", index: str = ""
               ) -> gateway_pb2.IngestItemsResponse:
        """Queue items (at most the gateway's max_items_per_request per call; pass the job_id of the
        first answer to add more to the same job). `regions` ("off", "float" or "int8"; "": the
        gateway's default) is how a catalog this call makes stores its objects' base regions, and
        `index` ("hnsw", "ivf_sq8" or "flat"; "": the gateway's default) its vector index.
        `duplicates` ("report" or "skip"; "": off) checks each item against the stored ones for the
        same picture (the job's `duplicates` lists them; "skip" does not store them)."""
        return self._call("IngestItems", _ingest_request(items, catalog, job_id, regions, duplicates, index), timeout)

    def ingest_paths(self, paths: Mapping[str, str | Path], catalog: str = "default",
                     metadata: Mapping[str, Mapping[str, str]] | None = None, by_path: bool = False,
                     timeout: float | None = None, regions: str = "", duplicates: str = "", index: str = ""
                     ) -> gateway_pb2.IngestItemsResponse:
        """Queue {item id: image path}."""
        return self.ingest(path_items(paths, metadata, by_path), catalog, timeout=timeout, regions=regions,
                           duplicates=duplicates, index=index)

    def job(self, job_id: str, timeout: float | None = None) -> gateway_pb2.IngestJob:
        return self._call("GetIngestJob", gateway_pb2.GetIngestJobRequest(job_id=job_id), timeout).job

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
             on_progress: Callable[[gateway_pb2.IngestJob], None] | None = None) -> gateway_pb2.IngestJob:
        """Poll a job until it is done (an ingestion: every item stored or failed; a re-embedding:
        switched or failed); TimeoutError after `timeout` seconds (None: no limit)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job.state == gateway_pb2.JOB_STATE_DONE:
                return job
            if end is not None and time.monotonic() + poll > end:
                raise TimeoutError(f"job {job_id} not done after {timeout} s: {job.done}/{job.submitted} done")
            time.sleep(poll)

    def delete(self, item_ids: list[str], catalog: str = "default", timeout: float | None = None) -> int:
        return self._call("DeleteItems", gateway_pb2.DeleteItemsRequest(catalog=catalog, item_ids=item_ids),
                          timeout).deleted

    def get(self, item_id: str, catalog: str = "default", timeout: float | None = None) -> gateway_pb2.Item:
        return self._call("GetItem", gateway_pb2.GetItemRequest(catalog=catalog, item_id=item_id), timeout).item

    def list_items(self, catalog: str = "default", page_size: int = 0, page_token: str = "",
                   timeout: float | None = None) -> gateway_pb2.ListItemsResponse:
        """One page of a catalog's items in item-id order (page_size 0: 50, at most 500); pass its
        next_page_token for the next page (empty on the last)."""
        req = gateway_pb2.ListItemsRequest(catalog=catalog, page_size=page_size, page_token=page_token)
        return self._call("ListItems", req, timeout)

    def items(self, catalog: str = "default", page_size: int = 0, timeout: float | None = None
              ) -> Iterator[gateway_pb2.Item]:
        """Every item of a catalog, in item-id order, a page (ListItems) at a time."""
        token = ""
        while True:
            page = self.list_items(catalog, page_size, token, timeout)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    def catalogs(self, timeout: float | None = None) -> list[gateway_pb2.Catalog]:
        return list(self._call("ListCatalogs", gateway_pb2.ListCatalogsRequest(), timeout).catalogs)

    def reembed(self, catalog: str = "default", model_version: str = "", timeout: float | None = None
                ) -> gateway_pb2.ReembedCatalogResponse:
        req = gateway_pb2.ReembedCatalogRequest(catalog=catalog, model_version=model_version)
        return self._call("ReembedCatalog", req, timeout)

    def adapt(self, catalog: str = "default", views: int = 0, max_objects: int = 0, timeout: float | None = None
              ) -> gateway_pb2.AdaptCatalogResponse:
        """Adapt the catalog's descriptor to its own objects, then re-embed it (one job: `wait` for it;
        it ends in phase "switched"). 0: the defaults (4 views, 5,000 objects)."""
        req = gateway_pb2.AdaptCatalogRequest(catalog=catalog, views=views, max_objects=max_objects)
        return self._call("AdaptCatalog", req, timeout)

    def jobs(self, catalog: str = "", limit: int = 20, timeout: float | None = None) -> list[gateway_pb2.IngestJob]:
        """The newest jobs (ingestion and re-embedding), newest first; failures via `job`."""
        req = gateway_pb2.ListIngestJobsRequest(catalog=catalog, limit=limit)
        return list(self._call("ListIngestJobs", req, timeout).jobs)

    def item_image(self, item_id: str, catalog: str = "default", max_side: int = 0, timeout: float | None = None
                   ) -> gateway_pb2.GetItemImageResponse:
        """A stored item's image (scaled down to max_side when set)."""
        req = gateway_pb2.GetItemImageRequest(catalog=catalog, item_id=item_id, max_side=max_side)
        return self._call("GetItemImage", req, timeout)

    def duplicates(self, catalog: str = "default", timeout: float = 600.0) -> gateway_pb2.FindDuplicatesResponse:
        """Groups of items whose images are the same picture (re-encoded, resized, cropped a little)."""
        return self._call("FindDuplicates", gateway_pb2.FindDuplicatesRequest(catalog=catalog), timeout)

    def export_catalog(self, catalog: str = "default", batch_size: int = 0, timeout: float = 3600.0
                       ) -> Iterator[gateway_pb2.CatalogRecord]:
        """Every record of a catalog (ExportCatalog: a header, batches of objects, a trailer); one
        stream, not retried (`timeout` covers all of it)."""
        req = gateway_pb2.ExportCatalogRequest(catalog=catalog, batch_size=batch_size)
        return self.stubs[next(self._turn) % len(self.stubs)].ExportCatalog(req, timeout=timeout)

    def import_catalog(self, records: Iterable[gateway_pb2.CatalogRecord], timeout: float = 3600.0
                       ) -> gateway_pb2.ImportCatalogResponse:
        """Stream exported records into a new catalog (the header's name); it goes live once all are in."""
        return self.stubs[next(self._turn) % len(self.stubs)].ImportCatalog(iter(records), timeout=timeout)

    def backup(self, catalog: str, out: str | Path, progress: Callable[[int, int], None] | None = None,
               timeout: float = 3600.0) -> dict:
        """Write everything a catalog holds to a new folder (visearch.backup); returns its manifest."""
        return backup.write(self.export_catalog(catalog, timeout=timeout), Path(out), progress)

    def restore(self, folder: str | Path, catalog: str, timeout: float = 3600.0) -> gateway_pb2.ImportCatalogResponse:
        """Bring a backup folder back as a new catalog, without re-embedding (its checksums are checked
        first: a damaged backup sends nothing)."""
        manifest = backup.verify(Path(folder))
        return self.import_catalog(backup.records(Path(folder), manifest, catalog), timeout)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """The asyncio client: the same methods as `Client`, awaited. Make it inside a running loop."""

    def __init__(self, addresses: str | Sequence[str] | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.2,
                 security: SecuritySettings | None = None, key: str | None = None, max_rate_retries: int = 3):
        super().__init__(addresses, api_key, timeout, retries, backoff, security, key, max_rate_retries)
        self.channels = [aio_channel(a, self.security, key=self.api_key) for a in self.addresses]
        self.stubs = [gateway_pb2_grpc.GatewayServiceStub(ch) for ch in self.channels]

    async def _call(self, method: str, request, timeout: float | None = None):
        deadline, first = self._plan(timeout)
        throttled = 0
        for attempt in itertools.count():
            stub = self.stubs[(first + attempt) % len(self.stubs)]
            try:
                return await getattr(stub, method)(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.aio.AioRpcError as exc:
                wait = self._retry_wait(exc, attempt, deadline, throttled)
                if wait is None:
                    raise
                throttled += retry_after(exc) is not None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def search(self, image: ImageArg, catalog: str = "default", top_k: int = 10,
                     filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
                     per_object: bool = False, timeout: float | None = None, correspondences: bool = False
                     ) -> gateway_pb2.SearchResponse:
        return await self._call("Search", _search_request(image, catalog, top_k, filters, rerank, full_frame,
                                                          per_object, correspondences), timeout)

    async def search_many(self, images: Sequence[ImageArg], catalog: str = "default", top_k: int = 10,
                          filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
                          timeout: float | None = None) -> list[gateway_pb2.BatchSearchResult]:
        reqs = [_search_request(img, catalog, top_k, filters, rerank, full_frame, False) for img in images]
        out: list[gateway_pb2.BatchSearchResult] = []
        for part in _batches(reqs):
            out += (await self._call("BatchSearch", gateway_pb2.BatchSearchRequest(searches=part), timeout)).results
        return out

    async def similar(self, item_id: str, catalog: str = "default", top_k: int = 10,
                      filters: Mapping[str, str] | None = None, rerank: str = "", full_frame: bool = False,
                      timeout: float | None = None, correspondences: bool = False) -> gateway_pb2.SearchResponse:
        return await self._call("Search", _similar_request(item_id, catalog, top_k, filters, rerank, full_frame,
                                                           correspondences), timeout)

    async def ingest(self, items: Iterable[gateway_pb2.IngestItem], catalog: str = "default", job_id: str = "",
                     timeout: float | None = None, regions: str = "", duplicates: str = "", index: str = ""
                     ) -> gateway_pb2.IngestItemsResponse:
        return await self._call("IngestItems", _ingest_request(items, catalog, job_id, regions, duplicates, index),
                                timeout)

    async def ingest_paths(self, paths: Mapping[str, str | Path], catalog: str = "default",
                           metadata: Mapping[str, Mapping[str, str]] | None = None, by_path: bool = False,
                           timeout: float | None = None, regions: str = "", duplicates: str = "", index: str = ""
                           ) -> gateway_pb2.IngestItemsResponse:
        return await self.ingest(path_items(paths, metadata, by_path), catalog, timeout=timeout, regions=regions,
                                 duplicates=duplicates, index=index)

    async def job(self, job_id: str, timeout: float | None = None) -> gateway_pb2.IngestJob:
        return (await self._call("GetIngestJob", gateway_pb2.GetIngestJobRequest(job_id=job_id), timeout)).job

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
                   on_progress: Callable[[gateway_pb2.IngestJob], None] | None = None) -> gateway_pb2.IngestJob:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if on_progress:
                on_progress(job)
            if job.state == gateway_pb2.JOB_STATE_DONE:
                return job
            if end is not None and time.monotonic() + poll > end:
                raise TimeoutError(f"job {job_id} not done after {timeout} s: {job.done}/{job.submitted} done")
            await asyncio.sleep(poll)

    async def delete(self, item_ids: list[str], catalog: str = "default", timeout: float | None = None) -> int:
        return (await self._call("DeleteItems", gateway_pb2.DeleteItemsRequest(catalog=catalog, item_ids=item_ids),
                                 timeout)).deleted

    async def get(self, item_id: str, catalog: str = "default", timeout: float | None = None) -> gateway_pb2.Item:
        return (await self._call("GetItem", gateway_pb2.GetItemRequest(catalog=catalog, item_id=item_id),
                                 timeout)).item

    async def list_items(self, catalog: str = "default", page_size: int = 0, page_token: str = "",
                         timeout: float | None = None) -> gateway_pb2.ListItemsResponse:
        req = gateway_pb2.ListItemsRequest(catalog=catalog, page_size=page_size, page_token=page_token)
        return await self._call("ListItems", req, timeout)

    async def items(self, catalog: str = "default", page_size: int = 0, timeout: float | None = None
                    ) -> AsyncIterator[gateway_pb2.Item]:
        """`async for item in vs.items("shop")`: every item, in item-id order, a page at a time."""
        token = ""
        while True:
            page = await self.list_items(catalog, page_size, token, timeout)
            for item in page.items:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def catalogs(self, timeout: float | None = None) -> list[gateway_pb2.Catalog]:
        return list((await self._call("ListCatalogs", gateway_pb2.ListCatalogsRequest(), timeout)).catalogs)

    async def reembed(self, catalog: str = "default", model_version: str = "", timeout: float | None = None
                      ) -> gateway_pb2.ReembedCatalogResponse:
        req = gateway_pb2.ReembedCatalogRequest(catalog=catalog, model_version=model_version)
        return await self._call("ReembedCatalog", req, timeout)

    async def adapt(self, catalog: str = "default", views: int = 0, max_objects: int = 0,
                    timeout: float | None = None) -> gateway_pb2.AdaptCatalogResponse:
        req = gateway_pb2.AdaptCatalogRequest(catalog=catalog, views=views, max_objects=max_objects)
        return await self._call("AdaptCatalog", req, timeout)

    async def jobs(self, catalog: str = "", limit: int = 20, timeout: float | None = None
                   ) -> list[gateway_pb2.IngestJob]:
        req = gateway_pb2.ListIngestJobsRequest(catalog=catalog, limit=limit)
        return list((await self._call("ListIngestJobs", req, timeout)).jobs)

    async def item_image(self, item_id: str, catalog: str = "default", max_side: int = 0,
                         timeout: float | None = None) -> gateway_pb2.GetItemImageResponse:
        req = gateway_pb2.GetItemImageRequest(catalog=catalog, item_id=item_id, max_side=max_side)
        return await self._call("GetItemImage", req, timeout)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# The name the CLI, the benchmarks and the tests have used.
GatewayClient = Client
