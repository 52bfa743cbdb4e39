"""Prometheus metrics and request ids, shared by every process.

Each service serves `/metrics` on VISEARCH_METRICS_PORT (0 = off). A request id
(`x-request-id` metadata, made at the gateway when the caller sent none) rides
on every downstream gRPC call and on the Celery task headers, and every log line
written while handling it carries it (and, when tracing is on, the call's span: visearch/tracing.py).
"""

from __future__ import annotations

import contextvars
import logging
import uuid

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from visearch import tracing

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("visearch_request_id", default="")

RPC_SECONDS = Histogram("visearch_rpc_seconds", "Server-side latency of each RPC", ["service", "method", "code"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RPC_IN_FLIGHT = Gauge("visearch_rpc_in_flight", "RPCs being handled now", ["service"])
RPC_REJECTED = Counter("visearch_rpc_rejected_total", "RPCs refused with RESOURCE_EXHAUSTED (in-flight limit)",
                       ["service"])
RATE_LIMITED = Counter("visearch_rate_limited_total", "Calls refused with RESOURCE_EXHAUSTED for being over their "
                       "key's rate", ["key"])
EMBED_BATCH = Histogram("visearch_embed_batch_size", "Images per model forward", buckets=(1, 2, 4, 8, 16, 32, 64))
INGESTED = Counter("visearch_ingested_items_total", "Items finished by the workers", ["catalog", "outcome"])
INGEST_BATCH_SECONDS = Histogram("visearch_ingest_batch_seconds", "Time to ingest one batch of items",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
QUEUE_DEPTH = Gauge("visearch_ingest_queue_depth", "Ingestion batches waiting in the queue")
INDEX_OBJECTS = Gauge("visearch_index_objects", "Objects stored per catalog", ["catalog"])
REEMBEDDED = Counter("visearch_reembedded_items_total", "Items re-embedded into a new catalog generation",
                     ["catalog", "outcome"])
GENERATION_SWITCHES = Counter("visearch_generation_switches_total", "Catalogs switched to a new generation",
                              ["catalog"])


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def bind_request_id(rid: str) -> None:
    """The request id of the call or task this context works on: on its log lines and, when tracing is
    on, on its span (attribute visearch.request_id)."""
    request_id.set(rid)
    tracing.tag_request(rid)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP (port 0 leaves it off)."""
    if port:
        start_http_server(port, addr=host)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid and not hasattr(record, "request_id"):
            record.request_id = rid
        return True
