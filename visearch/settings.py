"""Typed settings of every process, read once from VISEARCH_* environment variables.

All classes share one namespace, so VISEARCH_REDIS_URL means the same thing to the
gateway and to the worker. A dependency's address has no default: a service that
is not told where its dependencies are refuses to start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode

from visearch.clientsettings import Base as _Base
from visearch.clientsettings import SecuritySettings  # noqa: F401 - settings.SecuritySettings for the services
from visearch.search import INDEX_KINDS, REGION_MODES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"


# ONNX Runtime execution providers the embedded backend can be asked for (VISEARCH_ORT_PROVIDERS), in
# ORT's names in visearch/inference.py; the ones this onnxruntime build lacks fall back to the CPU.
ORT_PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")


def parse_ort_providers(v) -> tuple[str, ...]:
    """"tensorrt,cuda,cpu" (or a sequence of names) -> ("tensorrt", "cuda", "cpu"); ValueError naming an
    unknown or repeated provider."""
    names = [n.strip().lower() for n in (v.split(",") if isinstance(v, str) else v)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ORT_PROVIDER_NAMES]
    expected = f"expected a comma-separated list of {', '.join(ORT_PROVIDER_NAMES)}"
    if unknown:
        raise ValueError(f"unknown ONNX Runtime execution provider {', '.join(map(repr, unknown))}: {expected}")
    if not names:
        raise ValueError(f"no ONNX Runtime execution provider given: {expected}")
    if len(set(names)) != len(names):
        raise ValueError(f"ONNX Runtime execution providers {','.join(names)}: each may be named once")
    return tuple(names)


class TracingSettings(_Base):
    """OpenTelemetry traces (visearch/tracing.py, docs/OBSERVABILITY.md): off unless an endpoint is set."""

    # The OTLP/gRPC collector spans are sent to ("http://otel-collector:4317"; https:// for TLS, with
    # the standard OTEL_EXPORTER_OTLP_CERTIFICATE/HEADERS for its CA and credentials). Empty: no
    # tracing at all, no exporter, no span made.
    otlp_endpoint: str = ""
    # The share of the traces that start here (a call from an untraced caller, a task sent without a
    # trace) that are kept; a call or task that arrives inside a trace follows its caller's choice.
    trace_sample_ratio: float = Field(1.0, ge=0, le=1)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint {v!r}: expected http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)")
        return v


class ServerSettings(SecuritySettings, TracingSettings):
    host: str = "127.0.0.1"
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_seconds: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024
    # How often readiness (health SERVING/NOT_SERVING) is re-checked.
    health_interval_seconds: float = 2.0
    # Calls handled at once; beyond it RESOURCE_EXHAUSTED, not an unbounded queue.
    max_in_flight: int = 64
    # An image that takes longer than this to decode is refused.
    decode_timeout_seconds: float = 10.0
    # Prometheus /metrics over HTTP on this port; 0 leaves it off.
    metrics_port: int = 0


class InferenceSettings(_Base):
    # "onnxruntime" runs the model files in-process; "triton" calls a Triton server.
    backend: str = "onnxruntime"
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    # Empty means the highest version folder present.
    embedder_version: str = ""
    detector_version: str = ""
    triton_url: str = "127.0.0.1:8001"
    triton_timeout_seconds: float = 10.0
    ort_intra_op_threads: int = 1
    # Forwards run at once by the embedded backend (0: cores / intra-op threads); more callers queue.
    ort_max_concurrent_runs: int = 0
    # The embedded backend's execution providers, in order of preference: "cpu" (the default),
    # "cuda,cpu" or "tensorrt,cuda,cpu" with the `gpu` extra (onnxruntime-gpu, docs/SCALE.md). Those
    # this onnxruntime build lacks are dropped with one warning; an unknown name is refused at start.
    ort_providers: Annotated[tuple[str, ...], NoDecode] = ("cpu",)
    # The GPU the CUDA and TensorRT providers run on.
    ort_device_id: int = Field(0, ge=0)
    # TensorRT: FP16 kernels, and where its built engines are kept between starts (building one takes
    # minutes; empty: ~/.cache/visearch/tensorrt).
    ort_trt_fp16: bool = True
    ort_trt_cache_dir: str = ""
    max_batch: int = 32

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("onnxruntime", "triton"):
            raise ValueError(f"unknown inference backend {v!r} (onnxruntime or triton)")
        return v

    @field_validator("ort_providers", mode="before")
    @classmethod
    def _known_providers(cls, v) -> tuple[str, ...]:
        return parse_ort_providers(v)


class EmbeddingSettings(ServerSettings, InferenceSettings):
    embedding_port: int
    # Local features (visearch.local) are extracted from the image at most this many pixels on its
    # longer side (docs/VERIFY.md: cost and accuracy per size).
    local_side: int = 640


class DetectionSettings(ServerSettings, InferenceSettings):
    @field_validator("detector_resize")
    @classmethod
    def _known_resize(cls, v: str) -> str:
        if v not in ("stretch", "letterbox"):
            raise ValueError(f"detector_resize {v!r}: expected stretch or letterbox")
        return v

    detection_port: int
    # Boxes scoring below this are dropped (a request may ask for another threshold).
    detector_min_score: float = 0.3
    # Greedy NMS overlap; boxes of different classes suppress each other unless per_class.
    detector_iou: float = 0.5
    detector_max_detections: int = 10
    detector_per_class: bool = False
    # "stretch" (how SSD was trained) or "letterbox" (aspect kept, padded).
    detector_resize: str = "stretch"
    max_batch: int = 16


class StoreSettings(_Base):
    milvus_uri: str
    milvus_token: str = ""
    # Where images sent as bytes are kept (content-addressed) so a re-embedding (workers) and the
    # console's thumbnails (gateway) can read them again; a folder they share (a ReadWriteMany
    # volume in production). Empty keeps nothing: such items cannot be re-embedded.
    blob_dir: str = ""
    # Where each stored object's local features are kept (visearch.localstore: files read by key for
    # a search's top candidates, out of the vector index's memory); empty: none are kept, and the
    # "verify" re-rank has nothing to verify against. A folder the workers and the re-rank service
    # share.
    local_dir: str = ""
    # HNSW graph degree and build width; search width is max(ef, top_k).
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 128
    # IVF_SQ8 catalogs: inverted lists per sealed segment (Milvus indexes each segment, up to about
    # 1M rows of 128-d, on its own) and lists probed per search.
    ivf_nlist: int = Field(1024, ge=1, le=65536)
    ivf_nprobe: int = Field(32, ge=1, le=65536)
    # Searches of a catalog that nothing wrote to for this long run Bounded instead of Strong (no
    # wait for the server's time tick); keep it above Milvus's common.gracefulTime (5 s by
    # default). Needs Redis (the write clock every writer marks); 0: every read Strong.
    bounded_window_seconds: float = 10.0
    # Whether a new catalog stores its objects' base regions (re-rank "regions" and "qam"): "off"
    # or "float" (24.6 KB an object in the vector store's memory); a request may choose per catalog
    # (`visearch ingest --regions`). Existing catalogs keep what they were made with.
    catalog_regions: str = "off"
    # The vector index of a new catalog (INDEX_KINDS); a request may choose per catalog
    # (`visearch ingest --index`). Existing catalogs keep theirs.
    catalog_index: str = "hnsw"

    @field_validator("catalog_regions", "catalog_index")
    @classmethod
    def _catalog_choice(cls, v: str, info: ValidationInfo) -> str:
        allowed = {"catalog_regions": REGION_MODES, "catalog_index": INDEX_KINDS}[info.field_name]
        if v not in allowed:
            raise ValueError(f"{info.field_name} {v!r}: expected one of {', '.join(allowed)}")
        return v


class RerankDefaultSettings(_Base):
    # The method when a request names none: "none", "regions", "qam", "qe" or "verify". "verify"
    # (geometric verification, docs/VERIFY.md) measured above "qe" on every protocol it was chosen
    # on; "qam" is best on objects small in cluttered catalog images with full-frame rows only.
    # One VISEARCH_RERANK_DEFAULT read by the re-rank service and by the gateway (which must know
    # whether to fetch the query's regions or local features).
    rerank_default: str = "verify"


class RerankSettings(ServerSettings, StoreSettings, RerankDefaultSettings):
    rerank_port: int
    # Where "verify" finds the parameters recorded beside each model version (verify.json).
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    # Where region and global vectors are read from; empty leaves only "none".
    milvus_uri: str = ""
    # alpha-QE: the query plus its top k candidates weighted by similarity^alpha.
    qe_k: int = 5
    qe_alpha: float = 3.0


class RootsSettings(_Base):
    # Folders the gateway may read when an item names a path; empty refuses paths. Workers given
    # them also check that each file they open lies inside them (or the blob folder).
    ingest_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    @field_validator("ingest_roots", mode="before")
    @classmethod
    def _split_roots(cls, v):
        if isinstance(v, str):
            return [p for p in v.split(":") if p]
        return v


class QueueSettings(_Base):
    # redis://host:port/db, or redis+sentinel://h1:p1,h2:p2,h3:p3/<master>/<db> (visearch/redisconn.py).
    redis_url: str
    # The password of the Redis the URL names, kept out of the URL (a Kubernetes Secret beside a
    # ConfigMap's URL: deploy/k8s); put into it as the URL's own password. A URL that has a password
    # of its own must not be given another.
    redis_password: SecretStr = SecretStr("")
    # Seconds before an unacknowledged ingestion task is handed to another worker;
    # above the longest task, so a slow task is never run twice at once.
    visibility_timeout: int = 900
    job_ttl_seconds: int = 7 * 24 * 3600
    ingest_batch: int = 16
    # A task recorded in the ledger and not seen alive for this long is looked for in the queue and
    # among the unacknowledged messages, and sent again when it is in neither (visearch/ledger.py).
    lost_task_after_seconds: float = 60.0
    ledger_every_seconds: float = 10.0

    @model_validator(mode="before")
    @classmethod
    def _password_into_url(cls, data):
        if isinstance(data, dict):
            password = data.get("redis_password")
            if isinstance(password, SecretStr):
                password = password.get_secret_value()
            if password and isinstance(data.get("redis_url"), str):
                from visearch.redisconn import with_password

                data = {**data, "redis_url": with_password(data["redis_url"], password)}
        return data


class ClientSettings(SecuritySettings):
    detection_addr: str
    embedding_addr: str
    rpc_timeout_seconds: float = 30.0


class QuotaSettings(_Base):
    """Per-key call rates and the audit trail of the gateway (visearch/quota.py, visearch/audit.py, docs/QUOTAS.md)."""

    # The rate of a key whose entry in the key file names none: calls per second on average, a
    # token bucket per key in Redis shared by every gateway replica; 0: unlimited (the default).
    rate_per_second: float = Field(0.0, ge=0)
    # Calls a key may make at once above its rate (the bucket's size); 0: max(1, rate_per_second).
    rate_burst: float = Field(0.0, ge=0)
    # Where the gateway appends one JSON line per ingest, delete, re-embed and admin call (refused
    # ones too); empty: no audit trail. `visearch up` sets <data dir>/logs/audit.log.
    audit_log: str = ""


INGEST_OBJECTS = ("detected", "detected+full", "full")
QUERY_OBJECTS = ("best", "full", "both")


class GatewaySettings(ServerSettings, StoreSettings, QueueSettings, ClientSettings, RootsSettings, QuotaSettings,
                      RerankDefaultSettings):
    @field_validator("query_objects")
    @classmethod
    def _known_query_policy(cls, v: str) -> str:
        if v not in QUERY_OBJECTS:
            raise ValueError(f"query_objects {v!r}: expected one of {', '.join(QUERY_OBJECTS)}")
        return v

    gateway_port: int
    rerank_addr: str
    # Candidates handed to re-ranking (at least top_k).
    rerank_candidates: int = 100
    # Pin the embedding model this gateway was deployed with ("embedder:1"; "" = any): on a
    # mismatch it is NOT_SERVING and creating a catalog fails FAILED_PRECONDITION (existing
    # catalogs are always searched with their own model version).
    expected_model: str = ""
    # What part of the query photo is searched: "best" (the detector's best box, the full frame
    # when it finds nothing), "full" (never crop), or "both" (best box and full frame, each
    # item scored by the better of the two). A request's full_frame flag forces "full".
    # "both" by default: cropping wins on objects small in clutter and loses on product-centred
    # photos; "both" keeps most of each (docs/DETECTION.md, bench/detect_eval.py).
    query_objects: str = "both"
    # How much less a row counts when it comes from a crop of the query ("both": the best box) or is a
    # detected object of a catalog image rather than its full frame: a crop wins an item only when it
    # beats the full frames by this much (docs/VERIFY.md: chosen on train-only protocols).
    query_crop_margin: float = 0.0
    catalog_crop_margin: float = 0.05
    # "both": ask the store for the full frame's rows as soon as its vector is back, while the box's
    # forward runs, then for the box's rows (two store calls a search); off: one call for both views
    # after both forwards. On by default, where the store is a Milvus server with its own CPU; the
    # embedded mesh's Milvus Lite turns it off, since its per-call work runs on the same cores
    # (docs/VERIFY.md, "Stop 42").
    early_full_frame_search: bool = True
    max_items_per_request: int = 10_000


class WorkerSettings(StoreSettings, QueueSettings, ClientSettings, RootsSettings, TracingSettings):
    # Where catalog adaptation (services/worker/adapt.py) reads the base model's record and writes the
    # adapted version: the repository the embedding service serves (a shared volume in production).
    model_repository: Path = DEFAULT_MODEL_REPOSITORY

    @field_validator("ingest_objects")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in INGEST_OBJECTS:
            raise ValueError(f"ingest_objects {v!r}: expected one of {', '.join(INGEST_OBJECTS)}")
        return v

    @field_validator("ingest_max_objects")
    @classmethod
    def _objects_bound(cls, v: int) -> int:
        if not 1 <= v <= 31:  # the full frame + these stay under the store's 32 objects per item
            raise ValueError(f"ingest_max_objects {v}: expected 1..31")
        return v

    # Store base regions of every object for re-ranking (needs a model with region outputs).
    ingest_regions: bool = True
    # Store local features of every object for geometric verification (needs VISEARCH_LOCAL_DIR).
    ingest_local_features: bool = True
    # What is stored per catalog image: "detected" (one object per detected box, the full frame
    # when nothing is found), "detected+full" (those and the full frame), or "full".
    ingest_objects: str = "detected+full"
    # At most this many detected objects per catalog image (the best ones).
    ingest_max_objects: int = 3
    # Tasks in flight per worker (pool children): two keep the model services busy while a task
    # is between calls (reading its images, writing the store); measured in docs/PERFORMANCE.md.
    worker_concurrency: int = 2
    # Retries of a batch whose dependency is down, with backoff 1, 2, 4 ... 60 s: about 3 minutes in
    # all, past a Milvus server's restart (~40 s) before an item is given up.
    max_retries: int = 8
    # /metrics of pool child n on worker_metrics_port + n; 0 leaves it off.
    worker_metrics_port: int = 0
    # The address those /metrics listen on (0.0.0.0 where Prometheus scrapes the pod: deploy/k8s).
    host: str = "127.0.0.1"
    # Seconds the previous generation is kept after a re-embedding switched (in-flight searches
    # finish on it, late writes are carried over), before it is dropped.
    retire_after_seconds: float = 300.0


class ConsoleSettings(SecuritySettings):
    """The web console (services/console): an HTTP server in front of the gateway's gRPC API."""

    console_port: int
    gateway_addr: str
    host: str = "127.0.0.1"
    # Largest query photo accepted from the browser.
    max_upload_bytes: int = 16 * 1024 * 1024
    # Longer side of the result thumbnails.
    thumb_side: int = 320
    # A connection that sends nothing for this long is closed; at most max_connections at once.
    idle_timeout_seconds: float = 30.0
    max_connections: int = 64
    # One request (headers, body and the answer, a search included) gets this long in all.
    request_deadline_seconds: float = 120.0
    rpc_timeout_seconds: float = 30.0
