"""The vector store: a catalog is a Milvus alias over one generation of collections.

A catalog `c` is the alias `vs_c`, pointing at the physical collection of its live
generation, `vsg_c_<n>`. A generation is made by one embedding model (property
`visearch.model`) and never holds another model's vectors. Re-embedding a catalog
with a new model builds generation n+1 beside the live one (ingestion writes to
both meanwhile), then moves the alias in one call: searches resolve the alias once
per request and use that one generation throughout (global vectors, regions, query
model version), so no answer ever mixes two models. The old generation is dropped
later (services/worker/reembed.py).

Schema (one row per stored object; an item may have several objects):
  object_id  VARCHAR primary key, "<item_id>#<n>" (n < 32): deterministic, so
             re-ingesting an item upserts the same rows instead of adding new ones,
             and an item's rows are found by primary key
  item_id    VARCHAR, the catalog's own id
  vector     FLOAT_VECTOR(dim), L2-normalised, metric IP (= cosine)
  box        ARRAY<FLOAT>[4], the object's box in the catalog image (pixels)
  metadata   JSON, the item's string metadata (exact-match filters)
  source     VARCHAR, where the item's image can be read again (a path; "" if it cannot),
             what re-embedding reads
  stamp      INT64, when the item was last ingested (ns): a generation being built
             is in step with the live one when its items carry the same stamps
Index: chosen per catalog when it is made (INDEX_KINDS, `visearch ingest --index`). The default,
HNSW (M=16, efConstruction=200), search ef = max(hnsw_ef, top_k): at catalog sizes up to a few
million it gives recall@10 > 0.98 at millisecond cost, and it needs no training step, so a new
catalog is searchable from its first row. IVF_SQ8 (nlist per segment, nprobe per search) and FLAT
(exact) are the others; docs/CAPACITY.md measures them.
A search with another model's vectors is refused.
Every value in an expression (keys, filters) is escaped by visearch.expr; rows are read and
deleted by primary key through `pk_in`, never pymilvus's unescaped `ids=`.
A collection Milvus reports released (a restarted server loads nothing) is loaded again and
the call retried, on every read; one reported gone is forgotten and answers NOT_FOUND.
Consistency: collections are Strong, so an acknowledged ingest is visible to the next search.
A Strong read on a Milvus server waits for the next time tick (up to 200 ms per call,
measured: docs/PERFORMANCE.md), which would be most of a search. With a `WriteClock` (a
Redis key per catalog holding the time of its last write, in Redis's clock, set by every
writer before and after each write), reads of a catalog nothing wrote to within the reader's
`bounded_window_seconds` run Bounded (no wait; everything older than the server's
gracefulTime, 5 s by default, is visible) and the others stay Strong: read-your-writes
across processes at Bounded cost. Without a clock, or with the window 0, every read is Strong.

Region vectors (re-ranking, visearch.regions) live in a second collection per generation,
`vsgr_<catalog>_<n>`, keyed by the same object ids: one row per object with its base regions
packed into one FLOAT_VECTOR (MAX_REGIONS x region dim, zero-padded; `n` says how many
rows are real) and their boxes; it is read by primary key only (FLAT index, never
searched). A separate collection rather than a second vector field: Milvus 2.3 servers
allow one vector field per collection.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from visearch import expr
from visearch.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.localstore import LocalStore
from visearch.settings import INDEX_KINDS, REGION_MODES, StoreSettings

CATALOG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}", re.ASCII)
ID_MAX = 256
# Objects stored per item (detections in one catalog image); bounded so an item's
# rows are found by primary key, never by scanning.
MAX_OBJECTS = 32
MAX_REGIONS = 24
MODEL_PROP = "visearch.model"
DIM_PROP = "visearch.dim"
# Per-catalog storage, chosen when the catalog is made and kept by every generation of it:
# whether each object's base regions (re-rank "regions" and "qam") are stored, and how. "off" (the
# default for new catalogs) keeps the in-memory cost per object at its vector, index and fields
# (about 1 KB); "float" adds MAX_REGIONS x region dim float32 (24.6 KB at 24 x 256), held in memory
# by a FLAT collection; "int8" keeps them out of Milvus, one file per object beside the local
# features (int8 with a scale per region: 6.6 KB at 24 x 256, read by key for a search's
# candidates only, none of it in memory). A generation made before the property existed stores
# them as "float".
REGIONS_PROP = "visearch.regions"
LEGACY_REGIONS = "float"
# The vector index (INDEX_KINDS), also chosen when the catalog is made and kept by every generation
# of it (a re-embedding builds the new generation's with the same kind). A generation made before
# the property existed has HNSW.
INDEX_PROP = "visearch.index"
LEGACY_INDEX = "hnsw"
SOURCE_MAX = 2048
OBJECT_ID_RE = re.compile(r"([^#]+)#([0-9]{1,2})", re.DOTALL)  # "<item_id>#<n>", n < MAX_OBJECTS
GEN_RE = re.compile(r"vsg_([A-Za-z][A-Za-z0-9_]{0,62})_([0-9]+)", re.ASCII)
# An item's metadata: bounded so one item can neither exceed Milvus's 64 KiB JSON field (which
# fails the write) nor bloat the queue's messages.
METADATA_MAX_KEYS = 64
METADATA_VALUE_MAX_BYTES = 2048
METADATA_MAX_BYTES = 16 * 1024
MAX_FILTERS = 16
# Milvus error codes (the same on Milvus Lite and Milvus 2.3 servers).
COLLECTION_NOT_FOUND = 100
COLLECTION_NOT_LOADED = 101
PK_CHUNK = 1024  # primary keys per expression
QUERY_LIMIT = 16384  # the most rows one Milvus query returns
# Items per page of `list_items` (ListItems); a page's rows (MAX_OBJECTS per item, one item more)
# stay under Milvus's query window of 16,384 rows.
MAX_PAGE = 500
FOOTPRINT_SAMPLE = 256  # rows read to estimate a catalog's bytes per object
log = logging.getLogger(__name__)


class _RaisedToCaller(logging.Filter):
    """Drops pymilvus's record of a failed call: it logs each one at ERROR with a traceback before
    raising it here, where the store handles it (a catalog not made yet is no failure) or turns it
    into the error its caller reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_log_rpc_error"


def _pymilvus_logs_as_ours() -> None:
    """pymilvus gives its loggers a plain-text handler of its own on import: its records (connection
    recovery warnings, say) go through the process's logging instead, one JSON line each in the
    services, without its copies of the errors raised to the store."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    decorators = logging.getLogger("pymilvus.decorators")
    if not any(isinstance(f, _RaisedToCaller) for f in decorators.filters):
        decorators.addFilter(_RaisedToCaller())


_pymilvus_logs_as_ours()


@dataclass(frozen=True)
class Generation:
    """One physical generation of a catalog: its collections and the model that made them."""

    catalog: str
    number: int
    model_tag: str
    dim: int
    regions: str = LEGACY_REGIONS  # REGION_MODES: whether objects' base regions are stored
    index: str = LEGACY_INDEX  # INDEX_KINDS: the vector index

    @property
    def collection(self) -> str:
        return f"vsg_{self.catalog}_{self.number}"

    @property
    def region_collection(self) -> str:
        return f"vsgr_{self.catalog}_{self.number}"

    @property
    def model_version(self) -> str:
        return self.model_tag.rpartition(":")[2] if ":" in self.model_tag else ""


def check_catalog(name: str) -> str:
    if not CATALOG_RE.fullmatch(name or ""):
        raise InvalidArgument(f"catalog name {name[:80]!r} is invalid: a letter, then up to 62 letters, digits or '_'")
    return name


def check_regions(mode: str) -> str:
    if mode not in REGION_MODES:
        raise InvalidArgument(f"regions {mode[:40]!r}: expected one of {', '.join(REGION_MODES)}")
    return mode


def check_index(kind: str) -> str:
    if kind not in INDEX_KINDS:
        raise InvalidArgument(f"index {kind[:40]!r}: expected one of {', '.join(INDEX_KINDS)}")
    return kind


def check_storage(gen: Generation, regions: str, index: str = "") -> None:
    """FAILED_PRECONDITION when a request asks an existing catalog for other storage than it was made
    with (`regions`, `index` "": no wish)."""
    for what, have, want in (("regions", gen.regions, regions), ("index", gen.index, index)):
        if want and have != want:
            raise FailedPrecondition(f"catalog {gen.catalog!r} was made with {what} {have}, not {want}: "
                                     "a catalog's storage is chosen when it is made (use a new catalog name)")


def index_params(kind: str, settings: StoreSettings) -> tuple[str, dict]:
    """Milvus's index type and build parameters for an index kind."""
    return {"hnsw": ("HNSW", {"M": settings.hnsw_m, "efConstruction": settings.hnsw_ef_construction}),
            "ivf_sq8": ("IVF_SQ8", {"nlist": settings.ivf_nlist}),
            "flat": ("FLAT", {})}[kind]


def search_params(kind: str, settings: StoreSettings, limit: int) -> dict:
    """Milvus's search parameters for an index kind, returning `limit` rows."""
    return {"hnsw": {"ef": max(settings.hnsw_ef, limit)},
            "ivf_sq8": {"nprobe": min(settings.ivf_nprobe, settings.ivf_nlist)},
            "flat": {}}[kind]


IVF_SQ8_ROW_OVERHEAD = 94  # bytes a loaded IVF_SQ8 row holds beyond its codes and list id (measured)


def index_bytes(kind: str, dim: int, settings: StoreSettings) -> float:
    """Bytes per object a loaded index of this kind holds in memory, its vector included."""
    if kind == "hnsw":
        m = settings.hnsw_m
        # hnswlib's layout (Milvus's HNSW): 2M neighbour ids and a count at level 0, its label, and
        # on average 1/(M-1) upper levels of M ids and a count; the index holds the vector itself.
        return dim * 4 + 2 * m * 4 + 4 + 8 + (m * 4 + 4) / (m - 1)
    if kind == "ivf_sq8":
        # A byte per dimension and the row's id in its inverted list, plus what the engine holds per
        # row beyond them: measured on Milvus 2.3.5, 1M x 128 loaded on a restarted server, 230 B a
        # row in all, so 94 more (docs/CAPACITY.md). The float vectors stay in object storage: a read
        # by key (exact) fetches them without growing the resident memory.
        return dim + 8 + IVF_SQ8_ROW_OVERHEAD
    return dim * 4  # flat: the vectors themselves


def check_region_rows(object_id: str, feats: np.ndarray, boxes: np.ndarray, dim: int) -> int:
    n = len(feats)
    if not 0 < n <= MAX_REGIONS or feats.shape[1] != dim or np.shape(boxes) != (n, 4):
        raise InvalidArgument(f"object {object_id!r}: {n} regions of dim {feats.shape[1]} "
                              f"(1 to {MAX_REGIONS} of dim {dim} are stored)")
    return n


REGION_MAGIC = b"VSR1"


def pack_regions(feats: np.ndarray, boxes: np.ndarray) -> bytes:
    """An object's base regions in the "int8" form: a header (magic, n, dim), a float32 scale per
    region, the regions as int8 (each row scaled by max |x| / 127), the boxes as float32."""
    f = np.asarray(feats, np.float32)
    scale = np.abs(f).max(axis=1) / 127.0
    q = np.round(f / np.where(scale > 0, scale, 1.0)[:, None]).clip(-127, 127).astype(np.int8)
    head = REGION_MAGIC + np.array([len(f), f.shape[1]], "<u2").tobytes()
    return head + scale.astype("<f4").tobytes() + q.tobytes() + np.asarray(boxes, "<f4").tobytes()


def unpack_regions(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if data[:4] != REGION_MAGIC or len(data) < 8:
        raise FailedPrecondition("a stored region record is not in the int8 form")
    n, dim = (int(x) for x in np.frombuffer(data[4:8], "<u2"))
    off = 8
    scale = np.frombuffer(data[off:off + 4 * n], "<f4")
    off += 4 * n
    q = np.frombuffer(data[off:off + n * dim], np.int8).reshape(n, dim)
    off += n * dim
    boxes = np.frombuffer(data[off:off + 16 * n], "<f4").reshape(n, 4)
    if len(data) != off + 16 * n:
        raise FailedPrecondition("a stored region record has the wrong length")
    return q.astype(np.float32) * scale[:, None], boxes.astype(np.float32)


def check_item_id(item_id: str) -> str:
    """An item id is data: any printable text up to ID_MAX - 8 bytes of UTF-8 (Milvus counts bytes;
    "#<n>" is added per object), with no '#' (it separates the object number)."""
    if (not item_id or len(item_id.encode()) > ID_MAX - 8 or "#" in item_id
            or any(ord(c) < 32 for c in item_id)):
        raise InvalidArgument(f"item id {item_id[:80]!r} is invalid: 1-{ID_MAX - 8} bytes of UTF-8, "
                              "no '#' or control characters")
    return item_id


def check_metadata(metadata: dict[str, str], item_id: str = "") -> dict[str, str]:
    """An item's metadata as it will be stored and filtered on, or INVALID_ARGUMENT saying why not."""
    who = f"item {item_id[:80]!r}: " if item_id else ""
    if len(metadata) > METADATA_MAX_KEYS:
        raise InvalidArgument(f"{who}{len(metadata)} metadata keys; at most {METADATA_MAX_KEYS}")
    total = 0
    for k, v in metadata.items():
        expr.check_key(k)
        n = len(v.encode())
        if n > METADATA_VALUE_MAX_BYTES:
            raise InvalidArgument(f"{who}metadata value of {k[:80]!r} is {n} bytes; at most {METADATA_VALUE_MAX_BYTES}")
        total += len(k.encode()) + n
    if total > METADATA_MAX_BYTES:
        raise InvalidArgument(f"{who}metadata of {total} bytes; at most {METADATA_MAX_BYTES}")
    return metadata


def check_filters(filters: dict[str, str]) -> dict[str, str]:
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"{len(filters)} filters; at most {MAX_FILTERS}")
    for k, v in filters.items():
        expr.check_key(k, "filter key")
        if len(v.encode()) > METADATA_VALUE_MAX_BYTES:
            raise InvalidArgument(f"filter value of {k[:80]!r} is over {METADATA_VALUE_MAX_BYTES} bytes")
    return filters


def milvus_client(uri: str, token: str = "", timeout: float | None = None) -> MilvusClient:
    # pymilvus pings every 10 s even when idle; Milvus Lite's server keeps gRPC's default
    # policy (one ping per 5 minutes) and answers GOAWAY "too_many_pings", dropping calls.
    # Ping only while calls are in flight, and rarely.
    return MilvusClient(uri=uri, token=token, timeout=timeout,
                        grpc_options={"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False})


@dataclass
class StoredObject:
    object_id: str
    item_id: str
    box: tuple[float, float, float, float]
    metadata: dict[str, str]
    score: float = 0.0
    source: str = ""
    stamp: int = 0


@dataclass
class CatalogInfo:
    name: str
    model_tag: str
    dim: int
    objects: int
    generation: int = 0
    building: Generation | None = None
    building_objects: int = 0
    regions: str = LEGACY_REGIONS
    footprint: Footprint | None = None
    index: str = LEGACY_INDEX


@dataclass(frozen=True)
class Footprint:
    """Bytes per stored object of one generation: `memory` is what the vector store holds in memory
    to search it (the vector, its index, the loaded scalar fields, the region collection when
    regions are stored); `total` adds the side data read by key (local features). Estimated from the
    schema and a sample of rows (`sampled`); source images kept for re-embedding are not counted."""

    memory: int
    total: int
    sampled: int


Target = str | Generation  # a catalog name (its live generation) or one generation
STRONG, BOUNDED = "Strong", "Bounded"


class WriteClock:
    """When each catalog was last written, shared by every process through Redis, in Redis's own
    clock (no skew between hosts): a key per catalog holding the time of its last write. Each
    reader compares it with its own window, so writers and readers need not agree on one."""

    LIFETIME = 3600  # seconds a mark is kept; far above any window
    _MARK = "local t = redis.call('TIME') redis.call('SET', KEYS[1], t[1], 'EX', ARGV[1]) return t[1]"

    def __init__(self, redis):
        self.r = redis
        self._mark = redis.register_script(self._MARK)

    @staticmethod
    def key(catalog: str) -> str:
        return f"vs:wrote:{catalog}"

    def wrote(self, catalog: str) -> None:
        self._mark(keys=[self.key(catalog)], args=[self.LIFETIME])

    def seconds_since(self, catalog: str) -> float | None:
        """Seconds since the catalog's last marked write (None: none within LIFETIME)."""
        p = self.r.pipeline(transaction=False)
        p.get(self.key(catalog))
        p.time()
        last, (now, _) = p.execute()
        return None if last is None else float(now) - float(last)


class VectorStore:
    def __init__(self, settings: StoreSettings, clock: WriteClock | None = None):
        self.settings = settings
        self.clock = clock  # writers mark with it whatever their own window; readers need it to go Bounded
        self._client: MilvusClient | None = None
        # Local features beside the rows (visearch.localstore), kept in step by every write and delete.
        self.local = LocalStore(settings.local_dir) if settings.local_dir else None
        self._connect_lock = threading.Lock()
        self._gens: dict[str, Generation] = {}  # physical name -> generation (immutable once made)
        self._region_dims: dict[str, int] = {}
        self._create_lock = threading.Lock()

    @property
    def client(self) -> MilvusClient:
        """The Milvus client, connected on first use: a process that starts before Milvus listens
        (or while it restarts) reports the store unreachable (UNAVAILABLE, health NOT_SERVING) and
        connects once it answers, instead of exiting."""
        client = self._client
        if client is None:
            with self._connect_lock:
                if self._client is None:
                    self._client = milvus_client(self.settings.milvus_uri, self.settings.milvus_token)
                client = self._client
        return client

    def read_level(self, target: Target) -> str:
        """Bounded when the write clock says nothing wrote to the catalog within this reader's
        window (1 s added for the clock's whole seconds); Strong otherwise, and whenever the clock
        cannot be read (Redis away: slower reads, never missing ones)."""
        window = self.settings.bounded_window_seconds
        if self.clock is None or window <= 0:
            return STRONG
        catalog = target if isinstance(target, str) else target.catalog
        try:
            since = self.clock.seconds_since(catalog)
        except Exception as exc:  # noqa: BLE001 - any failure of the clock means "not sure"
            log.warning("write clock unreadable, reading Strong: %s", exc)
            return STRONG
        return BOUNDED if since is None or since > window + 1 else STRONG

    def _wrote(self, gen: Generation) -> None:
        """Called before and after each write: readers during it and for a window after it read Strong."""
        if self.clock is not None:
            self.clock.wrote(gen.catalog)

    @staticmethod
    def alias(catalog: str) -> str:
        return f"vs_{check_catalog(catalog)}"

    def ping(self) -> bool:
        self.client.list_collections()
        return True

    # ---- generations ------------------------------------------------------------
    def live(self, catalog: str) -> Generation | None:
        """The generation the catalog's alias points at now (one call to Milvus), or None."""
        alias = self.alias(catalog)
        try:
            desc = self.client.describe_collection(alias)
        except MilvusException:
            if self.client.has_collection(alias):
                raise
            return None
        name = desc.get("collection_name", "")
        m = GEN_RE.fullmatch(name)
        if not m or m.group(1) != catalog:
            raise FailedPrecondition(f"collection {alias!r} was made by an older visearch without generations: "
                                     f"drop it (or use another catalog name) and ingest again")
        known = name in self._gens
        gen = self._describe(catalog, int(m.group(2)), desc)  # from this answer: never a stale model
        if not known:
            self._load(gen.collection)  # once per generation and process, like `generation`
        return gen

    def generation(self, catalog: str, number: int) -> Generation | None:
        """Generation `number` of a catalog, live or not, or None when it does not exist."""
        name = f"vsg_{check_catalog(catalog)}_{int(number)}"
        if name in self._gens:
            return self._gens[name]
        if not self.client.has_collection(name):
            return None
        gen = self._describe(catalog, number, self.client.describe_collection(name))
        self._load(name)
        return gen

    def _describe(self, catalog: str, number: int, desc: dict) -> Generation:
        props = desc.get("properties", {})
        gen = Generation(catalog, number, props.get(MODEL_PROP, ""), int(props.get(DIM_PROP, 0)),
                         props.get(REGIONS_PROP, LEGACY_REGIONS), props.get(INDEX_PROP, LEGACY_INDEX))
        self._gens[gen.collection] = gen
        return gen

    def generations(self, catalog: str) -> list[Generation]:
        """Every generation of a catalog, oldest first (the live one, one being built, one being retired)."""
        numbers = sorted(int(m.group(2)) for m in map(GEN_RE.fullmatch, self.client.list_collections())
                         if m and m.group(1) == catalog)
        return [g for g in (self.generation(catalog, n) for n in numbers) if g is not None]

    def building(self, catalog: str, live: Generation | None = None) -> Generation | None:
        """The generation being built beside the live one (newer than it), if any."""
        live = live or self.live(catalog)
        newer = [g for g in self.generations(catalog) if live is None or g.number > live.number]
        return newer[-1] if newer else None

    def write_targets(self, catalog: str) -> list[Generation]:
        """Where an ingest is written: the live generation and the one being built, if any."""
        live = self.live(catalog)
        if live is None:
            return []
        building = self.building(catalog, live)
        return [live, building] if building else [live]

    def catalog_model(self, catalog: str) -> tuple[str, int] | None:
        """(model tag, dim) of a catalog's live generation, or None when it does not exist."""
        gen = self.live(catalog)
        return (gen.model_tag, gen.dim) if gen else None

    def _load(self, name: str) -> None:
        """Collections of an earlier run come back released after a Milvus restart: load before use
        (a no-op when loaded)."""
        if str(self.client.get_load_state(name).get("state", "")).endswith("Loaded"):
            return
        self.client.load_collection(name)

    def _forget(self, name: str) -> None:
        self._gens.pop(name, None)
        self._region_dims.pop(name, None)

    def _read(self, name: str, fn):
        """fn() on collection `name`, healing what a Milvus restart or a drop leaves behind: a
        collection reported released is loaded again and fn retried once (every process notices
        by itself, at its next read); one reported gone is forgotten and answers NOT_FOUND."""
        try:
            return fn()
        except MilvusException as exc:
            if exc.code == COLLECTION_NOT_FOUND:
                self._forget(name)
                raise NotFound(f"collection {name!r} no longer exists (dropped, or retired by a re-embedding): "
                               "try again") from None
            if exc.code != COLLECTION_NOT_LOADED:
                raise
        log.warning("collection %s was not loaded (Milvus restarted?): loading it again", name)
        self.client.load_collection(name)
        return fn()

    def _query_pks(self, name: str, ids: list[str], fields: list[str], level: str = STRONG) -> list[dict]:
        """The rows of `name` with these primary keys (escaped; in chunks so expressions stay bounded)."""
        out: list[dict] = []
        for start in range(0, len(ids), PK_CHUNK):
            chunk = ids[start:start + PK_CHUNK]
            out += self._read(name, lambda c=chunk: self.client.query(
                name, filter=expr.pk_in("object_id", c), output_fields=fields, consistency_level=level))
        return out

    def _delete_pks(self, name: str, ids: list[str]) -> None:
        for start in range(0, len(ids), PK_CHUNK):
            chunk = ids[start:start + PK_CHUNK]
            self._read(name, lambda c=chunk: self.client.delete(name, filter=expr.pk_in("object_id", c)))

    def ensure_catalog(self, catalog: str, meta: ModelMeta, regions: str = "", index: str = "") -> Generation:
        """The catalog's live generation; a new catalog gets generation 1 made for this model, storing
        regions as asked (`regions`; "": the settings' `catalog_regions`) under the vector index
        asked for (`index`; "": the settings' `catalog_index`). An existing catalog keeps what it was
        made with: asking for another mode is FAILED_PRECONDITION."""
        with self._create_lock:
            gen = self.live(catalog)
            if gen is None:
                gen = self.create_generation(catalog, meta, regions or self.settings.catalog_regions,
                                             index or self.settings.catalog_index)
                try:
                    self.client.create_alias(gen.collection, self.alias(catalog))
                except MilvusException:
                    # Another process made the catalog at the same moment: use the one it made.
                    if self.live(catalog) is None:
                        raise
                gen = self.live(catalog)
        check_storage(gen, regions, index)
        self.check_model(gen, meta)
        return gen

    def create_generation(self, catalog: str, meta: ModelMeta, regions: str = "", index: str = "") -> Generation:
        """A new, empty generation numbered after every existing one (not live until `switch`). It
        stores regions as `regions` says, under the vector index `index`; "": as the catalog's live
        generation does (a re-embedding keeps the catalog's storage), or the settings' default for a
        new catalog."""
        numbers = [g.number for g in self.generations(catalog)]
        if not regions or not index:
            live = self.live(catalog)
            regions = regions or (live.regions if live is not None else self.settings.catalog_regions)
            index = index or (live.index if live is not None else self.settings.catalog_index)
        gen = Generation(check_catalog(catalog), max(numbers, default=0) + 1, meta.tag, meta.dim,
                         check_regions(regions), check_index(index))
        if gen.regions == "int8" and self.local is None:
            raise FailedPrecondition("regions int8 are kept in files beside the local features: this store has no "
                                     "local dir (VISEARCH_LOCAL_DIR)")
        self._create(gen)
        self._gens[gen.collection] = gen
        return gen

    def switch(self, gen: Generation) -> None:
        """Point the catalog at `gen`: one alias change, atomic for every reader."""
        self.flush(gen)
        self.client.alter_alias(gen.collection, self.alias(gen.catalog))

    def drop_generation(self, gen: Generation) -> None:
        live = self.live(gen.catalog)
        if live is not None and live.number == gen.number:
            raise FailedPrecondition(f"generation {gen.number} of catalog {gen.catalog!r} is live: not dropped")
        for name in (gen.region_collection, gen.collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
            self._gens.pop(name, None)
            self._region_dims.pop(name, None)
        if self.local is not None:
            self.local.drop(gen.collection)
            self.local.drop(gen.region_collection)

    # ---- backup and restore -----------------------------------------------------
    def export_rows(self, target: Target, batch: int = 128):
        """Every stored object of a generation, in batches: dicts with the row's fields (`vector` as
        float32), its local features (`local`: bytes or None) and its base regions (`regions`:
        (features, boxes) or None). One scan of the collection (`scan`)."""
        gen = self.resolve(target)
        fields = ["object_id", "item_id", "vector", "box", "metadata", "source", "stamp"]
        for rows in self.scan(gen, fields, batch):
            ids = [r["object_id"] for r in rows]
            local = self.get_local(gen, ids)
            regions = self.get_regions(gen, ids) if gen.regions != "off" else {}
            yield [{**{k: r[k] for k in fields if k != "vector"}, "vector": np.asarray(r["vector"], np.float32),
                    "local": local.get(r["object_id"]), "regions": regions.get(r["object_id"])} for r in rows]

    def scan(self, target: Target, fields: list[str], batch: int = 512, level: str = STRONG):
        """Every row of a generation with these fields, in batches in primary-key order. Each batch's
        ids are found as `list_items` finds a page's (`_next_keys`), then its rows read by primary
        key, every id escaped: not pymilvus's
        query iterator, which writes its cursor into the expression unescaped (an id with a quote or
        backslash breaks it)."""
        gen = self.resolve(target)
        cols = list(dict.fromkeys(["object_id", *fields]))
        # Ids read per round: several batches' worth, so that a round narrows the range to about one
        # batch even when the engine answers rows in no order (Milvus Lite: insertion order).
        cap = min(QUERY_LIMIT, max(8 * batch, batch + 2))
        after, more = "", True
        while more:
            page, more = self._next_keys(gen, "object_id", after, batch, cap, level)
            if not page:
                return
            found = sorted(self._query_pks(gen.collection, page, cols, level), key=lambda r: r["object_id"])
            if found:
                yield found
            after = page[-1]

    def _next_keys(self, gen: Generation, field: str, after: str, n: int, cap: int, level: str
                   ) -> tuple[list[str], bool]:
        """The first `n` distinct values of a string field greater than `after`, in order, and whether
        more follow. Milvus has no ORDER BY and answers a query with a `limit` in the engine's own
        order (Milvus Lite: insertion order), so the range is narrowed: read the field of up to
        `cap` rows of (after, upper]; fewer than `cap` rows is all of the range; else upper becomes
        the (n + 1)-th smallest value read, which shrinks the range (`cap` must be enough rows to
        hold n + 2 distinct values). Every value in an expression is escaped (visearch.expr)."""
        lower = expr.compare(field, ">", after)
        where, upper = lower, None
        while True:
            rows = self._read(gen.collection, lambda f=where: self.client.query(
                gen.collection, filter=f, output_fields=[field], limit=cap, consistency_level=level))
            values = sorted({r[field] for r in rows})
            if len(rows) < cap:
                break
            if upper is not None and values[n] >= upper:  # the loop ends because the range shrinks
                raise FailedPrecondition("the vector store answered rows outside the range asked: "
                                         "its rows cannot be read in order")
            upper = values[n]
            where = f"{lower} and {expr.compare(field, '<=', upper)}"
        # More may follow when the range held more than n, or was narrowed (rows deleted between the
        # rounds can leave n or fewer below the bound, and more above it).
        return values[:n], len(values) > n or upper is not None

    def restore_generation(self, catalog: str, meta: ModelMeta, regions: str, index: str = "") -> Generation:
        """A new generation for a catalog being restored (ALREADY_EXISTS when the catalog exists); it
        goes live with `go_live` once every row is in, and is dropped if the restore fails."""
        if self.live(catalog) is not None:
            raise AlreadyExists(f"catalog {catalog!r} exists: restore into a new catalog name")
        return self.create_generation(catalog, meta, check_regions(regions), index)

    def restore_rows(self, gen: Generation, rows: list[dict]) -> int:
        """Write exported rows into `gen` as they were (ids, vectors, boxes, metadata, sources, stamps),
        with their local features and regions."""
        for r in rows:
            if len(r["vector"]) != gen.dim:
                raise InvalidArgument(f"object {r['object_id'][:80]!r}: a vector of {len(r['vector'])} dimensions; "
                                      f"the catalog's model gives {gen.dim}")
            m = OBJECT_ID_RE.fullmatch(r["object_id"])
            if not m or m.group(1) != r["item_id"] or int(m.group(2)) >= MAX_OBJECTS:
                raise InvalidArgument(f"object id {r['object_id'][:80]!r} is not '<item id>#<n>' of its item")
            check_item_id(r["item_id"])
            check_metadata(r["metadata"], r["item_id"])
            if len(r["source"].encode()) > SOURCE_MAX:
                raise InvalidArgument(f"item {r['item_id'][:80]!r}: source longer than {SOURCE_MAX} bytes")
        self._wrote(gen)
        self._upsert(gen.collection, [{"object_id": r["object_id"], "item_id": r["item_id"],
                                       "vector": np.asarray(r["vector"], np.float32).tolist(),
                                       "box": [float(b) for b in r["box"]], "metadata": dict(r["metadata"]),
                                       "source": r["source"], "stamp": int(r["stamp"])} for r in rows])
        self.upsert_local(gen, {r["object_id"]: r["local"] for r in rows if r.get("local")})
        with_regions = [(r["object_id"], *r["regions"]) for r in rows if r.get("regions") is not None]
        if with_regions:
            self.upsert_regions(gen, with_regions)
        self._wrote(gen)
        return len(rows)

    def go_live(self, gen: Generation) -> None:
        """Make a restored generation its catalog's live one (ALREADY_EXISTS if the catalog was made
        meanwhile)."""
        self.flush(gen)
        try:
            self.client.create_alias(gen.collection, self.alias(gen.catalog))
        except MilvusException:
            if self.live(gen.catalog) is not None:
                raise AlreadyExists(f"catalog {gen.catalog!r} was made while it was being restored") from None
            raise

    def check_model(self, target: Target, meta: ModelMeta) -> None:
        gen = self.resolve(target)
        if gen.model_tag != meta.tag or gen.dim != meta.dim:
            raise FailedPrecondition(
                f"catalog {gen.catalog!r} (generation {gen.number}) holds vectors of model {gen.model_tag} "
                f"(dim {gen.dim}); the model used is {meta.tag} (dim {meta.dim}): re-embed the catalog before "
                f"searching it with this model")

    def resolve(self, target: Target) -> Generation:
        """A generation as given, or a catalog's live one (NOT_FOUND when the catalog does not exist)."""
        if isinstance(target, Generation):
            return target
        gen = self.live(target)
        if gen is None:
            raise NotFound(f"catalog {target!r} does not exist")
        return gen

    def _create(self, gen: Generation) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("object_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        schema.add_field("item_id", DataType.VARCHAR, max_length=ID_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=gen.dim)
        schema.add_field("box", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX)
        schema.add_field("stamp", DataType.INT64)
        index = self.client.prepare_index_params()
        index_type, params = index_params(gen.index, self.settings)
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        self.client.create_collection(gen.collection, schema=schema, index_params=index,
                                      consistency_level="Strong",
                                      properties={MODEL_PROP: gen.model_tag, DIM_PROP: str(gen.dim),
                                                  REGIONS_PROP: gen.regions, INDEX_PROP: gen.index})

    # ---- items ------------------------------------------------------------------
    @staticmethod
    def object_ids(item_id: str, start: int = 0) -> list[str]:
        return [f"{item_id}#{n}" for n in range(start, MAX_OBJECTS)]

    def _existing_objects(self, name: str, candidate_ids: list[str], fields: list[str]) -> list[dict]:
        # Primary-key lookups: a filter on item_id would scan every row (Milvus Lite
        # brute-forces unflushed rows in Python), which made ingestion quadratic.
        return self._query_pks(name, candidate_ids, fields) if candidate_ids else []

    def upsert_items(self, target: Target, items: list[tuple]) -> int:
        """Replace each item's objects: upsert rows `<item>#0..n-1`, then drop the item's older rows `#n...`.

        items: (item_id, [(vector, box), ...], metadata[, source[, stamp]]); the stamp defaults to now.
        Upsert first, delete after, so a crash between the two leaves the item
        searchable (with at worst stale extra objects), never missing.
        """
        gen = self.resolve(target)
        name = gen.collection
        rows, stale_candidates = [], []
        now = time.time_ns()
        for item_id, objects, metadata, *rest in items:
            source = rest[0] if rest else ""
            stamp = rest[1] if len(rest) > 1 else now
            if not 0 < len(objects) <= MAX_OBJECTS:
                raise InvalidArgument(f"item {item_id!r} has {len(objects)} objects; 1 to {MAX_OBJECTS} are stored")
            if len(source.encode()) > SOURCE_MAX:
                raise InvalidArgument(f"item {item_id[:80]!r}: source longer than {SOURCE_MAX} bytes")
            for n, (vec, box) in enumerate(objects):
                rows.append({"object_id": f"{item_id}#{n}", "item_id": item_id,
                             "vector": np.asarray(vec, np.float32).tolist(), "box": [float(b) for b in box],
                             "metadata": dict(metadata), "source": source, "stamp": int(stamp)})
            stale_candidates += self.object_ids(item_id, len(objects))
        self._wrote(gen)
        if rows:
            self._upsert(name, rows)
        stale = [r["object_id"] for r in self._existing_objects(name, stale_candidates, ["object_id"])]
        if stale:
            self._delete_pks(name, stale)
            self._delete_regions(gen, stale)
            if self.local is not None:
                self.local.delete(name, stale)
        self._wrote(gen)
        return len(rows)

    def delete_items(self, target: Target, item_ids: list[str]) -> int:
        gen = self.resolve(target)
        found = self._existing_objects(gen.collection, [o for i in item_ids for o in self.object_ids(i)], ["object_id"])
        if found:
            self._wrote(gen)
            self._delete_pks(gen.collection, [r["object_id"] for r in found])
            self._delete_regions(gen, [r["object_id"] for r in found])
            if self.local is not None:
                self.local.delete(gen.collection, [r["object_id"] for r in found])
            self._wrote(gen)
        return len({r["object_id"].rsplit("#", 1)[0] for r in found})

    def item_rows(self, target: Target, item_ids: list[str]) -> dict[str, list[StoredObject]]:
        """item id -> its stored objects (with box, metadata, source, stamp), in object order."""
        gen = self.resolve(target)
        rows = self._existing_objects(gen.collection, [o for i in item_ids for o in self.object_ids(i)],
                                      ["object_id", "item_id", "box", "metadata", "source", "stamp"])
        out: dict[str, list[StoredObject]] = {}
        for r in sorted(rows, key=lambda r: int(r["object_id"].rsplit("#", 1)[1])):
            out.setdefault(r["item_id"], []).append(self._obj(r))
        return out

    def list_items(self, target: Target, after: str = "", limit: int = 50
                   ) -> tuple[list[tuple[str, list[StoredObject]]], str]:
        """A page of a generation's items in item-id order: the first `limit` items whose id sorts
        after `after` ("": from the first), each with its objects in object order, and the id to
        pass as `after` for the next page ("" on the last page).

        Milvus has no ORDER BY (Milvus Lite ignores `order_by_fields`), and which rows a query
        with a `limit` returns is the engine's choice (measured: Milvus Lite 3.2 returns them in
        insertion order, Milvus 2.3.5 by primary key; neither promises it). Both engines compare
        strings in filters in code point order, as Python does (`item_id > "x"`, with quotes,
        backslashes and non-ASCII ids: tests/test_store.py). So the page is found by narrowing a
        range of ids: read the ids of up to `cap` rows of (after, upper]; fewer than `cap` is all
        of the range; else the range holds at least limit + 2 items (an item has at most
        MAX_OBJECTS rows) and upper becomes the (limit + 1)-th smallest id read, which shrinks it.
        One round when the engine returns about the smallest ids (Milvus servers; Milvus Lite with
        ids ingested in order), a few when it returns rows in no order; each round drops at least
        the items above the new bound. (Not pymilvus's query iterator: it writes its primary-key
        cursor into the expression unescaped, and an id with a quote or backslash breaks it.)
        Item ids never contain '#', so the page's rows are then read by primary key."""
        if not 0 < limit <= MAX_PAGE:
            raise InvalidArgument(f"page size {limit}: 1 to {MAX_PAGE} items")
        gen = self.resolve(target)
        level = self.read_level(gen)
        # An item has at most MAX_OBJECTS rows: a full read of `cap` rows holds limit + 2 items.
        page, more = self._next_keys(gen, "item_id", after, limit, MAX_OBJECTS * (limit + 1) + 1, level)
        # By primary key: exactly the page's items (one deleted meanwhile is left out).
        rows = self._query_pks(gen.collection, [o for i in page for o in self.object_ids(i)],
                               ["object_id", "item_id", "box", "metadata", "source", "stamp"], level)
        out: dict[str, list[StoredObject]] = {i: [] for i in page}
        for r in sorted(rows, key=lambda r: int(r["object_id"].rsplit("#", 1)[1])):
            out[r["item_id"]].append(self._obj(r))
        return [(i, objs) for i, objs in out.items() if objs], (page[-1] if more and page else "")

    @staticmethod
    def page_token(after: str) -> str:
        """The opaque page token of ListItems for "the items after this id" ("": no more pages)."""
        return "v1." + after.encode().hex() if after else ""

    @staticmethod
    def page_after(token: str) -> str:
        """The item id a page token stands for ("" for the first page), or INVALID_ARGUMENT."""
        if not token:
            return ""
        try:
            if not token.startswith("v1.") or len(token) > 2 * ID_MAX + 3:
                raise ValueError
            return check_item_id(bytes.fromhex(token[3:]).decode())
        except (ValueError, InvalidArgument):
            raise InvalidArgument(f"page_token {token[:40]!r} is not one ListItems gave") from None

    def item_stamps(self, target: Target, batch: int = 4096) -> dict[str, int]:
        """item id -> stamp of every item in a generation (a scan; an item's objects share its stamp).
        Every row, not only `#0` ones: Milvus 2.3 matches only prefixes with `like`."""
        out: dict[str, int] = {}
        for rows in self.scan(target, ["item_id", "stamp"], batch):
            out.update((r["item_id"], int(r["stamp"])) for r in rows)
        return out

    # ---- region vectors ---------------------------------------------------------
    def _region_dim(self, gen: Generation) -> int | None:
        name = gen.region_collection
        if name in self._region_dims:
            return self._region_dims[name]
        if not self.client.has_collection(name):
            return None
        self._load(name)
        dim = int(self.client.describe_collection(name).get("properties", {}).get(DIM_PROP, 0))
        self._region_dims[name] = dim
        return dim

    def upsert_regions(self, target: Target, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> int:
        """Store each object's base regions: (object_id, features [R, d], boxes [R, 4] pixels)."""
        if not rows:
            return 0
        gen = self.resolve(target)
        if gen.regions == "off":
            raise FailedPrecondition(f"catalog {gen.catalog!r} was made with regions off: it stores none")
        dim = int(rows[0][1].shape[1])
        if gen.regions == "int8":
            for object_id, feats, boxes in rows:
                check_region_rows(object_id, feats, boxes, dim)
            self.local.put_many(gen.region_collection, {o: pack_regions(f, b) for o, f, b in rows})
            return len(rows)
        with self._create_lock:
            found = self._region_dim(gen)
            if found is None:
                self._create_regions(gen, dim)
                self._region_dims[gen.region_collection] = dim
            elif found != dim:
                raise FailedPrecondition(f"catalog {gen.catalog!r} stores regions of dim {found}, the model gives {dim}")
        out = []
        for object_id, feats, boxes in rows:
            n = check_region_rows(object_id, feats, boxes, dim)
            packed = np.zeros((MAX_REGIONS, dim), np.float32)
            packed[:n] = feats
            out.append({"object_id": object_id, "n": n, "features": packed.ravel().tolist(),
                        "boxes": [float(b) for b in np.asarray(boxes, np.float32).ravel()]})
        self._wrote(gen)
        self._upsert(gen.region_collection, out)
        self._wrote(gen)
        return len(out)

    def _upsert(self, name: str, rows: list[dict]) -> None:
        try:
            self._read(name, lambda: self.client.upsert(name, rows))
        except MilvusException as exc:
            if exc.code == 1100:  # a value Milvus refuses (length, dimension): final, not a retry
                raise InvalidArgument(f"the vector store refused the rows: {exc.message}") from None
            raise

    def get_regions(self, target: Target, object_ids: list[str], level: str = STRONG
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """object_id -> (features [n, d], boxes [n, 4]) for the objects that have regions (`level`:
        the consistency of the search that found them)."""
        gen = self.resolve(target)
        if gen.regions == "int8":
            found = self.local.get_many(gen.region_collection, list(object_ids)) if object_ids else {}
            return {o: unpack_regions(b) for o, b in found.items()}
        dim = self._region_dim(gen)
        if dim is None or not object_ids:
            return {}
        rows = self._query_pks(gen.region_collection, list(object_ids), ["object_id", "n", "features", "boxes"], level)
        out = {}
        for r in rows:
            n = int(r["n"])
            feats = np.asarray(r["features"], np.float32).reshape(MAX_REGIONS, dim)[:n]
            out[r["object_id"]] = (feats, np.asarray(r["boxes"], np.float32).reshape(n, 4))
        return out

    def upsert_local(self, target: Target, rows: dict[str, bytes]) -> int:
        """Keep each object's local features (object id -> compact bytes); a no-op without a local dir."""
        if self.local is None or not rows:
            return 0
        self.local.put_many(self.resolve(target).collection, rows)
        return len(rows)

    def get_local(self, target: Target, object_ids: list[str]) -> dict[str, bytes]:
        """object id -> its local features, for the objects that have them."""
        if self.local is None or not object_ids:
            return {}
        return self.local.get_many(self.resolve(target).collection, list(object_ids))

    def get_vectors(self, target: Target, object_ids: list[str], level: str = STRONG) -> dict[str, np.ndarray]:
        """object_id -> its global vector (`level`: the consistency of the search that found them)."""
        if not object_ids:
            return {}
        rows = self._query_pks(self.resolve(target).collection, list(object_ids), ["object_id", "vector"], level)
        return {r["object_id"]: np.asarray(r["vector"], np.float32) for r in rows}

    def _create_regions(self, gen: Generation, dim: int) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("object_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX + 8)
        schema.add_field("n", DataType.INT64)
        schema.add_field("features", DataType.FLOAT_VECTOR, dim=MAX_REGIONS * dim)
        schema.add_field("boxes", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=MAX_REGIONS * 4)
        index = self.client.prepare_index_params()
        index.add_index(field_name="features", index_type="FLAT", metric_type="IP")
        self.client.create_collection(gen.region_collection, schema=schema, index_params=index,
                                      consistency_level="Strong", properties={DIM_PROP: str(dim)})

    def _delete_regions(self, gen: Generation, object_ids: list[str]) -> None:
        if object_ids and gen.regions == "int8":
            self.local.delete(gen.region_collection, list(object_ids))
        elif object_ids and self._region_dim(gen) is not None:
            self._delete_pks(gen.region_collection, list(object_ids))

    def get_item(self, target: Target, item_id: str) -> list[StoredObject]:
        gen = self.resolve(target)
        rows = self.item_rows(gen, [item_id]).get(item_id)
        if not rows:
            raise NotFound(f"item {item_id!r} is not in catalog {gen.catalog!r}")
        return rows

    def search(self, target: Target, vector: np.ndarray, limit: int, filters: dict[str, str] | None = None
               ) -> list[StoredObject]:
        return self.search_many(target, [vector], limit, filters)[0]

    def search_many(self, target: Target, vectors, limit: int, filters: dict[str, str] | None = None,
                    fields: tuple[str, ...] = ("item_id", "box", "metadata"), level: str | None = None
                    ) -> list[list[StoredObject]]:
        """Top `limit` objects for each query vector, in one call to Milvus (one round trip and one
        pass over the segments for all of a query's views). `level`: the read consistency
        (default `read_level`)."""
        gen = self.resolve(target)
        level = level or self.read_level(gen)
        where = " and ".join(expr.json_equals("metadata", k, v) for k, v in sorted(check_filters(filters or {}).items()))
        data = [np.asarray(v, np.float32).tolist() for v in vectors]
        res = self._read(gen.collection, lambda: self.client.search(
            gen.collection, data=data, limit=limit, filter=where, output_fields=list(fields), anns_field="vector",
            consistency_level=level, search_params={"metric_type": "IP",
                                                    "params": search_params(gen.index, self.settings, limit)}))
        out = []
        for found in res:
            rows = []
            for hit in found:
                ent = hit.get("entity", {})
                rows.append(StoredObject(object_id=hit.get("object_id", hit.get("id")), item_id=ent["item_id"],
                                         box=tuple(ent.get("box") or (0, 0, 0, 0)), metadata=ent.get("metadata") or {},
                                         score=float(hit["distance"])))
            out.append(rows)
        return out

    def count(self, target: Target, level: str = STRONG) -> int:
        name = self.resolve(target).collection
        res = self._read(name, lambda: self.client.query(name, filter="", output_fields=["count(*)"],
                                                         consistency_level=level))
        return int(res[0]["count(*)"])

    def list_catalogs(self, level: str = STRONG, footprint: bool = False) -> list[CatalogInfo]:
        """Every catalog with its live generation's object count (`level`: Bounded for figures that
        may lag a few seconds, e.g. metrics, and need not wait for a server's time tick), and with
        `footprint` its bytes per object."""
        names = sorted({m.group(1) for m in map(GEN_RE.fullmatch, self.client.list_collections()) if m})
        out = []
        for catalog in names:
            live = self.live(catalog)
            if live is None:  # generations without an alias: a creation that failed half-way
                continue
            building = self.building(catalog, live)
            objects = self.count(live, level)
            out.append(CatalogInfo(catalog, live.model_tag, live.dim, objects, live.number, building,
                                   self.count(building, level) if building else 0, live.regions,
                                   self.footprint(live, objects, level) if footprint else None, live.index))
        return out

    def footprint(self, target: Target, objects: int | None = None, level: str = STRONG,
                  sample: int = FOOTPRINT_SAMPLE) -> Footprint:
        """Bytes per object the generation takes (Footprint), from up to `sample` of its rows."""
        gen = self.resolve(target)
        objects = self.count(gen, level) if objects is None else objects
        rows = self._read(gen.collection, lambda: self.client.query(
            gen.collection, filter='object_id != ""', limit=sample, consistency_level=level,
            output_fields=["object_id", "item_id", "box", "metadata", "source", "stamp"])) if objects else []

        def text(v) -> int:  # a variable-length field: its UTF-8 bytes and a 4-byte offset
            return len(str(v or "").encode()) + 4

        fields = (sum(text(r["object_id"]) + text(r["item_id"]) + 4 * len(r.get("box") or ()) + 4
                      + text(json.dumps(r.get("metadata") or {}, separators=(",", ":"))) + text(r.get("source"))
                      + 8 for r in rows) / len(rows)) if rows else 0.0
        memory = index_bytes(gen.index, gen.dim, self.settings) + fields
        rdim = self._region_dim(gen)
        if rdim and objects:
            name = gen.region_collection
            with_regions = int(self._read(name, lambda: self.client.query(
                name, filter="", output_fields=["count(*)"], consistency_level=level))[0]["count(*)"])
            mean_id = sum(text(r["object_id"]) for r in rows) / len(rows) if rows else 0
            memory += with_regions / objects * (MAX_REGIONS * rdim * 4 + MAX_REGIONS * 4 * 4 + 4 + 8 + mean_id)
        local = 0.0
        if self.local is not None and rows:
            ids = [r["object_id"] for r in rows]
            local = sum(self.local.sizes(gen.collection, ids)) / len(rows)
            if gen.regions == "int8":  # region files: on disk, read by key, none of it in memory
                local += sum(self.local.sizes(gen.region_collection, ids)) / len(rows)
        return Footprint(round(memory), round(memory + local), len(rows))

    def flush(self, target: Target) -> None:
        gen = self.resolve(target)
        self.client.flush(gen.collection)
        if self._region_dim(gen) is not None:
            self.client.flush(gen.region_collection)

    @staticmethod
    def _obj(r: dict) -> StoredObject:
        return StoredObject(object_id=r["object_id"], item_id=r["item_id"], box=tuple(r.get("box") or (0, 0, 0, 0)),
                            metadata=r.get("metadata") or {}, source=r.get("source") or "", stamp=int(r.get("stamp") or 0))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
