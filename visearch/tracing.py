"""OpenTelemetry traces: one `setup(service, settings)` per process, off unless VISEARCH_OTLP_ENDPOINT is set.

What is traced once it is on (docs/OBSERVABILITY.md):
- every gRPC call served and made by the project's own servers and channels (the OpenTelemetry gRPC
  interceptors, added by `grpcserver.serve`, `aio_channel` and `sync_channel`; health checks and
  reflection left out), so W3C `traceparent` rides beside `x-request-id` from service to service;
- the Celery ingestion tasks, published (the gateway: `send_task` by name) and run (the workers:
  the OpenTelemetry Celery instrumentation), the trace context riding in the task's headers;
- every Redis command (the OpenTelemetry Redis instrumentation) and every Milvus call (pymilvus has
  no instrumentation: `MilvusClient`'s calls are wrapped here in client spans).

A trace starts only where work arrives: a gRPC call served or a task run with no trace of its caller
(then kept at VISEARCH_TRACE_SAMPLE_RATIO). A Redis or Milvus call outside any of them (the
worker's queue polling, the gateway's gauges refresh, readiness checks) starts none: with the
ratio at 1 they would be most of the spans and none of the answers.

Off, nothing here is imported beyond this module, no provider is installed, no interceptor is
added and no span is made (`enabled()` is False).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

# The span attribute carrying the request id (visearch.observability) of the call or task.
REQUEST_ID = "visearch.request_id"
# MilvusClient calls that reach the server, each traced as a client span "milvus <call>".
MILVUS_CALLS = ("search", "query", "query_iterator", "get", "upsert", "insert", "delete", "flush", "has_collection",
                "list_collections", "describe_collection", "create_collection", "drop_collection", "load_collection",
                "release_collection", "get_load_state", "create_alias", "alter_alias", "drop_alias", "create_index",
                "get_collection_stats")

_provider: Any = None  # the TracerProvider in use, None when tracing is off


def enabled() -> bool:
    return _provider is not None


def provider_for(service: str, settings) -> Any:
    """A TracerProvider exporting to settings.otlp_endpoint in batches (not installed)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_RESOURCE_ATTRIBUTES (e.g. deployment.environment, k8s.pod.name) is merged in by Resource.create.
    resource = Resource.create({"service.name": service, "service.namespace": "visearch",
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    provider = TracerProvider(resource=resource, sampler=sampler(settings.trace_sample_ratio))
    # Batched off the request path; queue size, batch size and delay follow the standard OTEL_BSP_* variables.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    return provider


def setup(service: str, settings) -> Any:
    """Trace this process as `service` when settings.otlp_endpoint is set; returns the provider (None: off).

    Call it once at start-up, before any channel or server is made (a worker: after the fork, see
    `setup_worker`)."""
    if not settings.otlp_endpoint:
        return None
    from opentelemetry import trace

    provider = provider_for(service, settings)
    trace.set_tracer_provider(provider)  # for any library that asks for the global one
    install(provider)
    log.info("tracing on", extra={"otlp_endpoint": settings.otlp_endpoint,
                                  "trace_sample_ratio": settings.trace_sample_ratio})
    return provider


def setup_worker(service: str, settings) -> None:
    """`setup` in each Celery pool process after the fork (an exporter's thread and channel must not
    cross one), and its spans flushed when the process ends."""
    if not settings.otlp_endpoint:
        return
    from celery.signals import worker_process_init, worker_process_shutdown

    @worker_process_init.connect(weak=False)
    def _start(**_):
        setup(service, settings)

    @worker_process_shutdown.connect(weak=False)
    def _stop(**_):
        shutdown()


def install(provider) -> None:
    """Trace with `provider` from now on: Redis, Milvus and Celery instrumented, and the gRPC
    interceptors handed to servers and channels made after this. Tests pass an in-memory one."""
    global _provider
    if _provider is not None:
        uninstall()
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    _provider = provider
    RedisInstrumentor().instrument(tracer_provider=provider)
    _celery_instrumentor().instrument(tracer_provider=provider)
    # Only in the processes that use the vector store (they imported pymilvus before this): the model
    # services never load it.
    if "pymilvus" in sys.modules:
        _instrument_milvus(provider.get_tracer(__name__))


def uninstall() -> None:
    """Undo `install` (tests): no instrumentation left, interceptors no longer handed out."""
    global _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().uninstrument()
    _celery_instrumentor().uninstrument()
    _uninstrument_milvus()
    _provider = None


def shutdown() -> None:
    """Export what is buffered and stop (the SDK also does this at interpreter exit)."""
    if _provider is not None:
        _provider.shutdown()


def tag_request(request_id: str) -> None:
    """Put the request id on the current span (the call's server span, the task's run span)."""
    if _provider is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute(REQUEST_ID, request_id)


# -- gRPC: the instrumentation's interceptors, on the project's own servers and channels ------------

def _grpc_filter():
    from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix

    return negate(any_of(health_check(), service_prefix("grpc.reflection.")))


def server_interceptors() -> list:
    """For grpc.aio.server(interceptors=...), first: the server span is current in every later
    interceptor and the handler. Empty when tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_grpc_filter())]


def aio_client_interceptors() -> list:
    """For grpc.aio channels, first: a client span per call, its context injected into the metadata."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors as make

    return make(tracer_provider=_provider, filter_=_grpc_filter())


def traced_channel(channel):
    """A blocking channel whose calls make client spans and carry the trace (the channel itself when off)."""
    if _provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(tracer_provider=_provider, filter_=_grpc_filter()))


# -- Sampling: traces start where work arrives ---------------------------------------------------------

def sampler(ratio: float):
    """Parent-based: a span inside a trace follows its parent; a span that would start a trace does so
    only if it is a call served or a task run (SERVER, CONSUMER), kept at `ratio`."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import SpanKind

    class EntryPoints(Sampler):
        def __init__(self, ratio: float):
            self.ratio = TraceIdRatioBased(ratio)

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None) -> SamplingResult:
            if kind not in (SpanKind.SERVER, SpanKind.CONSUMER):
                return SamplingResult(Decision.DROP)
            return self.ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"EntryPoints{{{self.ratio.get_description()}}}"

    return ParentBased(root=EntryPoints(ratio))


# -- Celery: the instrumentation, plus the gateway's send_task by name ----------------------------------

_celery_class: Any = None


def _celery_instrumentor():
    """The OpenTelemetry Celery instrumentation, mended for a task published by name from a process
    that does not register it (the gateway's `send_task`): upstream finds no task to keep that producer
    span on, so the span ends only when its context manager is garbage-collected (in CPython as soon
    as before_task_publish returns, before the message is sent). Here it is kept by task id and ended
    once the message is sent."""
    global _celery_class
    if _celery_class is None:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils
        from opentelemetry.propagate import inject

        class Instrumentor(CeleryInstrumentor):
            _instance = None  # a singleton of its own, not the upstream class's
            MAX_OPEN = 1000  # publishes that failed (no after_task_publish) are dropped past this many

            def _instrument(self, **kwargs):
                self._sent: dict[str, Any] = {}
                self._lock = threading.Lock()  # the gateway publishes from several threads
                super()._instrument(**kwargs)

            def _trace_before_publish(self, *args, **kwargs):
                if utils.retrieve_task_from_sender(kwargs) is not None:
                    return super()._trace_before_publish(*args, **kwargs)
                task_id = utils.retrieve_task_id_from_message(kwargs)
                headers = kwargs.get("headers")
                if task_id is None or headers is None:
                    return None
                name = str(kwargs.get("sender") or "unknown")
                span = self._tracer.start_span(f"apply_async/{name}", kind=trace.SpanKind.PRODUCER, attributes={
                    "celery.action": "apply_async", "celery.task_name": name, "messaging.message.id": task_id,
                    "messaging.destination": str(kwargs.get("routing_key") or "")})
                inject(headers, context=trace.set_span_in_context(span))
                with self._lock:
                    while len(self._sent) >= self.MAX_OPEN:
                        self._sent.pop(next(iter(self._sent))).end()
                    self._sent[task_id] = span
                return None

            def _trace_after_publish(self, *args, **kwargs):
                with self._lock:
                    span = self._sent.pop(utils.retrieve_task_id_from_message(kwargs) or "", None)
                if span is not None:
                    span.end()
                    return None
                return CeleryInstrumentor._trace_after_publish(*args, **kwargs)

        _celery_class = Instrumentor
    return _celery_class()


# -- Milvus: client spans around MilvusClient's calls ---------------------------------------------------

def _instrument_milvus(tracer) -> None:
    from pymilvus import MilvusClient

    for call in MILVUS_CALLS:
        original = getattr(MilvusClient, call, None)
        if original is not None and not hasattr(original, "__visearch_untraced__"):
            setattr(MilvusClient, call, _traced_milvus_call(tracer, call, original))


def _traced_milvus_call(tracer, call: str, original):
    from opentelemetry.trace import SpanKind

    @functools.wraps(original)
    def traced(self, *args, **kwargs):
        collection = kwargs.get("collection_name", args[0] if args else "")
        attributes = {"db.system.name": "milvus", "db.operation.name": call}
        name = f"milvus {call}"
        if isinstance(collection, str) and collection:
            attributes["db.collection.name"] = collection
            name += f" {collection}"
        with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
            return original(self, *args, **kwargs)

    traced.__visearch_untraced__ = original
    return traced


def _uninstrument_milvus() -> None:
    pymilvus = sys.modules.get("pymilvus")
    if pymilvus is None:
        return
    for call in MILVUS_CALLS:
        current = getattr(pymilvus.MilvusClient, call, None)
        original = getattr(current, "__visearch_untraced__", None)
        if original is not None:
            setattr(pymilvus.MilvusClient, call, original)
