"""The vector store: one Milvus collection per catalog.

Schema (one row per stored object; an item may have several objects):
  object_id  VARCHAR primary key, "<item_id>#<n>" (n < 32): deterministic, so
             re-ingesting an item upserts the same rows instead of adding new ones,
             and an item's rows are found by primary key
  item_id    VARCHAR, the catalog's own id
  vector     FLOAT_VECTOR(dim), L2-normalised, metric IP (= cosine)
  box        ARRAY<FLOAT>[4], the object's box in the catalog image (pixels)
  metadata   JSON, the item's string metadata (exact-match filters)
Index: HNSW (M=16, efConstruction=200), search ef = max(hnsw_ef, top_k): at
catalog sizes up to a few million it gives recall@10 > 0.98 at millisecond cost,
and it needs no training step, so a new catalog is searchable from its first row.
The collection records the model that made its vectors (property
`visearch.model`), and a search with another model's vectors is refused.
Consistency level: Strong, so an acknowledged ingest is visible to the next search.

Region vectors (re-ranking, visearch.regions) live in a second collection per catalog,
`vsr_<catalog>`, keyed by the same object ids: one row per object with its base regions
packed into one FLOAT_VECTOR (MAX_REGIONS x region dim, zero-padded; `n` says how many
rows are real) and their boxes; it is read by primary key only (FLAT index, never
searched). A separate collection rather than a second vector field: Milvus 2.3 servers
allow one vector field per collection.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient

from visearch.errors import FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.settings import StoreSettings

CATALOG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
ID_MAX = 256
# Objects stored per item (detections in one catalog image); bounded so an item's
# rows are found by primary key, never by scanning.
MAX_OBJECTS = 32
MAX_REGIONS = 24
MODEL_PROP = "visearch.model"
DIM_PROP = "visearch.dim"


def check_catalog(name: str) -> str:
    if not CATALOG_RE.match(name or ""):
        raise InvalidArgument(f"catalog name {name!r} is invalid: a letter, then up to 62 letters, digits or '_'")
    return name


def check_item_id(item_id: str) -> str:
    if not item_id or len(item_id) > ID_MAX - 8 or "#" in item_id or any(ord(c) < 32 for c in item_id):
        raise InvalidArgument(f"item id {item_id!r} is invalid: 1-{ID_MAX - 8} printable characters, no '#'")
    return item_id


def milvus_client(uri: str, token: str = "", timeout: float | None = None) -> MilvusClient:
    # pymilvus pings every 10 s even when idle; Milvus Lite's server keeps gRPC's default
    # policy (one ping per 5 minutes) and answers GOAWAY "too_many_pings", dropping calls.
    # Ping only while calls are in flight, and rarely.
    return MilvusClient(uri=uri, token=token, timeout=timeout,
                        grpc_options={"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False})


def _quote(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Milvus string literal


@dataclass
class StoredObject:
    object_id: str
    item_id: str
    box: tuple[float, float, float, float]
    metadata: dict[str, str]
    score: float = 0.0


@dataclass
class CatalogInfo:
    name: str
    model_tag: str
    dim: int
    objects: int


class VectorStore:
    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.client = milvus_client(settings.milvus_uri, settings.milvus_token)
        self._known: dict[str, tuple[str, int]] = {}
        self._region_dims: dict[str, int] = {}
        self._create_lock = threading.Lock()

    @staticmethod
    def collection(catalog: str) -> str:
        return f"vs_{check_catalog(catalog)}"

    @staticmethod
    def region_collection(catalog: str) -> str:
        return f"vsr_{check_catalog(catalog)}"

    def ping(self) -> bool:
        self.client.list_collections()
        return True

    def catalog_model(self, catalog: str) -> tuple[str, int] | None:
        """(model tag, dim) of a catalog, or None when it does not exist."""
        if catalog in self._known:
            return self._known[catalog]
        name = self.collection(catalog)
        if not self.client.has_collection(name):
            return None
        self._load(name)
        props = self.client.describe_collection(name).get("properties", {})
        found = (props.get(MODEL_PROP, ""), int(props.get(DIM_PROP, 0)))
        self._known[catalog] = found
        return found

    def _load(self, name: str) -> None:
        """Collections of an earlier run come back released after a Milvus restart: load before use
        (a no-op when loaded)."""
        if str(self.client.get_load_state(name).get("state", "")).endswith("Loaded"):
            return
        self.client.load_collection(name)

    def ensure_catalog(self, catalog: str, meta: ModelMeta) -> None:
        """Create the catalog's collection for this model, or check it was made by it."""
        with self._create_lock:
            found = self.catalog_model(catalog)
            if found is None:
                self._create(catalog, meta)
                self._known[catalog] = (meta.tag, meta.dim)
                return
        self.check_model(catalog, meta)

    def check_model(self, catalog: str, meta: ModelMeta) -> None:
        found = self.catalog_model(catalog)
        if found is None:
            raise NotFound(f"catalog {catalog!r} does not exist")
        tag, dim = found
        if tag != meta.tag or dim != meta.dim:
            raise FailedPrecondition(
                f"catalog {catalog!r} holds vectors of model {tag} (dim {dim}); the serving model is {meta.tag} "
                f"(dim {meta.dim}): re-embed the catalog before searching it with this model")

    def _create(self, catalog: str, meta: ModelMeta) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("object_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        schema.add_field("item_id", DataType.VARCHAR, max_length=ID_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=meta.dim)
        schema.add_field("box", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
        schema.add_field("metadata", DataType.JSON)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                        params={"M": self.settings.hnsw_m, "efConstruction": self.settings.hnsw_ef_construction})
        self.client.create_collection(self.collection(catalog), schema=schema, index_params=index,
                                      consistency_level="Strong",
                                      properties={MODEL_PROP: meta.tag, DIM_PROP: str(meta.dim)})

    @staticmethod
    def object_ids(item_id: str, start: int = 0) -> list[str]:
        return [f"{item_id}#{n}" for n in range(start, MAX_OBJECTS)]

    def _existing_objects(self, name: str, candidate_ids: list[str], fields: list[str]) -> list[dict]:
        # Primary-key lookups: a filter on item_id would scan every row (Milvus Lite
        # brute-forces unflushed rows in Python), which made ingestion quadratic.
        return self.client.get(name, ids=candidate_ids, output_fields=fields) if candidate_ids else []

    def upsert_items(self, catalog: str, items: list[tuple[str, list[tuple[np.ndarray, tuple]], dict[str, str]]]) -> int:
        """Replace each item's objects: upsert rows `<item>#0..n-1`, then drop the item's older rows `#n...`.

        Upsert first, delete after, so a crash between the two leaves the item
        searchable (with at worst stale extra objects), never missing.
        """
        name = self.collection(catalog)
        rows, stale_candidates = [], []
        for item_id, objects, metadata in items:
            if not 0 < len(objects) <= MAX_OBJECTS:
                raise InvalidArgument(f"item {item_id!r} has {len(objects)} objects; 1 to {MAX_OBJECTS} are stored")
            for n, (vec, box) in enumerate(objects):
                rows.append({"object_id": f"{item_id}#{n}", "item_id": item_id,
                             "vector": np.asarray(vec, np.float32).tolist(), "box": [float(b) for b in box],
                             "metadata": dict(metadata)})
            stale_candidates += self.object_ids(item_id, len(objects))
        if rows:
            self.client.upsert(name, rows)
        stale = [r["object_id"] for r in self._existing_objects(name, stale_candidates, ["object_id"])]
        if stale:
            self.client.delete(name, ids=stale)
            self._delete_regions(catalog, stale)
        return len(rows)

    def delete_items(self, catalog: str, item_ids: list[str]) -> int:
        name = self._existing(catalog)
        found = self._existing_objects(name, [o for i in item_ids for o in self.object_ids(i)], ["object_id"])
        if found:
            self.client.delete(name, ids=[r["object_id"] for r in found])
            self._delete_regions(catalog, [r["object_id"] for r in found])
        return len({r["object_id"].rsplit("#", 1)[0] for r in found})

    # ---- region vectors ---------------------------------------------------------
    def _region_dim(self, catalog: str) -> int | None:
        if catalog in self._region_dims:
            return self._region_dims[catalog]
        name = self.region_collection(catalog)
        if not self.client.has_collection(name):
            return None
        self._load(name)
        dim = int(self.client.describe_collection(name).get("properties", {}).get(DIM_PROP, 0))
        self._region_dims[catalog] = dim
        return dim

    def upsert_regions(self, catalog: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> int:
        """Store each object's base regions: (object_id, features [R, d], boxes [R, 4] pixels)."""
        if not rows:
            return 0
        dim = int(rows[0][1].shape[1])
        with self._create_lock:
            found = self._region_dim(catalog)
            if found is None:
                self._create_regions(catalog, dim)
                self._region_dims[catalog] = dim
            elif found != dim:
                raise FailedPrecondition(f"catalog {catalog!r} stores regions of dim {found}, the model gives {dim}")
        out = []
        for object_id, feats, boxes in rows:
            n = len(feats)
            if not 0 < n <= MAX_REGIONS or feats.shape[1] != dim or boxes.shape != (n, 4):
                raise InvalidArgument(f"object {object_id!r}: {n} regions of dim {feats.shape[1]} "
                                      f"(1 to {MAX_REGIONS} of dim {dim} are stored)")
            packed = np.zeros((MAX_REGIONS, dim), np.float32)
            packed[:n] = feats
            out.append({"object_id": object_id, "n": n, "features": packed.ravel().tolist(),
                        "boxes": [float(b) for b in np.asarray(boxes, np.float32).ravel()]})
        self.client.upsert(self.region_collection(catalog), out)
        return len(out)

    def get_regions(self, catalog: str, object_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """object_id -> (features [n, d], boxes [n, 4]) for the objects that have regions."""
        dim = self._region_dim(catalog)
        if dim is None or not object_ids:
            return {}
        rows = self.client.get(self.region_collection(catalog), ids=list(object_ids),
                               output_fields=["object_id", "n", "features", "boxes"])
        out = {}
        for r in rows:
            n = int(r["n"])
            feats = np.asarray(r["features"], np.float32).reshape(MAX_REGIONS, dim)[:n]
            out[r["object_id"]] = (feats, np.asarray(r["boxes"], np.float32).reshape(n, 4))
        return out

    def get_vectors(self, catalog: str, object_ids: list[str]) -> dict[str, np.ndarray]:
        """object_id -> its global vector."""
        if not object_ids:
            return {}
        rows = self.client.get(self._existing(catalog), ids=list(object_ids), output_fields=["object_id", "vector"])
        return {r["object_id"]: np.asarray(r["vector"], np.float32) for r in rows}

    def _create_regions(self, catalog: str, dim: int) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("object_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX + 8)
        schema.add_field("n", DataType.INT64)
        schema.add_field("features", DataType.FLOAT_VECTOR, dim=MAX_REGIONS * dim)
        schema.add_field("boxes", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=MAX_REGIONS * 4)
        index = self.client.prepare_index_params()
        index.add_index(field_name="features", index_type="FLAT", metric_type="IP")
        self.client.create_collection(self.region_collection(catalog), schema=schema, index_params=index,
                                      consistency_level="Strong", properties={DIM_PROP: str(dim)})

    def _delete_regions(self, catalog: str, object_ids: list[str]) -> None:
        if object_ids and self._region_dim(catalog) is not None:
            self.client.delete(self.region_collection(catalog), ids=list(object_ids))

    def get_item(self, catalog: str, item_id: str) -> list[StoredObject]:
        name = self._existing(catalog)
        rows = self._existing_objects(name, self.object_ids(item_id), ["object_id", "item_id", "box", "metadata"])
        if not rows:
            raise NotFound(f"item {item_id!r} is not in catalog {catalog!r}")
        return sorted((self._obj(r) for r in rows), key=lambda o: int(o.object_id.rsplit("#", 1)[1]))

    def search(self, catalog: str, vector: np.ndarray, limit: int, filters: dict[str, str] | None = None
               ) -> list[StoredObject]:
        name = self._existing(catalog)
        expr = " and ".join(f"metadata[{_quote(k)}] == {_quote(v)}" for k, v in sorted((filters or {}).items()))
        res = self.client.search(name, data=[np.asarray(vector, np.float32).tolist()], limit=limit, filter=expr,
                                 output_fields=["item_id", "box", "metadata"], anns_field="vector",
                                 search_params={"metric_type": "IP",
                                                "params": {"ef": max(self.settings.hnsw_ef, limit)}})
        out = []
        for hit in res[0]:
            ent = hit.get("entity", {})
            out.append(StoredObject(object_id=hit.get("object_id", hit.get("id")), item_id=ent["item_id"],
                                    box=tuple(ent.get("box") or (0, 0, 0, 0)), metadata=ent.get("metadata") or {},
                                    score=float(hit["distance"])))
        return out

    def count(self, catalog: str) -> int:
        res = self.client.query(self._existing(catalog), filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def list_catalogs(self) -> list[CatalogInfo]:
        out = []
        for name in sorted(self.client.list_collections()):
            if not name.startswith("vs_"):
                continue
            catalog = name[3:]
            tag, dim = self.catalog_model(catalog) or ("", 0)
            out.append(CatalogInfo(catalog, tag, dim, self.count(catalog)))
        return out

    def flush(self, catalog: str) -> None:
        self.client.flush(self._existing(catalog))
        if self._region_dim(catalog) is not None:
            self.client.flush(self.region_collection(catalog))

    def _existing(self, catalog: str) -> str:
        if self.catalog_model(catalog) is None:
            raise NotFound(f"catalog {catalog!r} does not exist")
        return self.collection(catalog)

    @staticmethod
    def _obj(r: dict) -> StoredObject:
        return StoredObject(object_id=r["object_id"], item_id=r["item_id"], box=tuple(r.get("box") or (0, 0, 0, 0)),
                            metadata=r.get("metadata") or {})

    def close(self) -> None:
        self.client.close()
