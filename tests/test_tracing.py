"""OpenTelemetry traces (visearch/tracing.py): off by default, and when on one trace per call across
the gRPC services, the Celery task, Redis and Milvus.

The services' spans are received by a small OTLP/gRPC collector in this process (the TraceService of
opentelemetry-proto), from the real services' exporters; this process's own spans (the caller's) go to
the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import wait_until
from visearch import tracing
from visearch.grpcserver import Service, aio_channel, serve, sync_channel
from visearch.mesh import free_port
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from visearch.settings import SecuritySettings, ServerSettings, TracingSettings

RERANK = "/visearch.rerank.v1.RerankService/Rerank"
KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}  # OTLP's numbers


@dataclass(frozen=True)
class Span:
    """One span, from the in-memory exporter or from OTLP, in one shape."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict = field(hash=False)
    start: int = 0


def from_sdk(s: ReadableSpan) -> Span:
    return Span(str(s.resource.attributes.get("service.name", "")), f"{s.context.trace_id:032x}",
                f"{s.context.span_id:016x}", f"{s.parent.span_id:016x}" if s.parent else "", s.name, s.kind.name,
                dict(s.attributes or {}), s.start_time or 0)


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span it is sent."""

    def __init__(self):
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(service, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                    KINDS[s.kind], {a.key: _value(a.value) for a in s.attributes}, s.start_time_unix_nano))
        with self.lock:
            self.spans += got
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def collector():
    c = Collector()
    c.server.start()
    yield c
    c.server.stop(0)


def memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    from opentelemetry.sdk.resources import Resource

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}), sampler=tracing.sampler(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans():
    """Tracing installed in this process with an in-memory exporter (and removed after); its
    `tracer` makes this process's own spans."""
    provider, exporter = memory_provider()
    tracing.install(provider)
    exporter.tracer = provider.get_tracer("test")
    yield exporter
    tracing.uninstall()
    provider.shutdown()


def finished(exporter: InMemorySpanExporter) -> list[Span]:
    return [from_sdk(s) for s in exporter.get_finished_spans()]


def render(spans: list[Span]) -> str:
    """The spans of a trace as an indented tree: service, kind, name (children by start time)."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start):
            lines.append(f"{'  ' * depth}{s.service:<10} {s.kind:<8} {s.name}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def chain(spans: list[Span], span: Span) -> list[Span]:
    """`span` and its ancestors up to the trace's root, nearest first."""
    by_id = {s.span_id: s for s in spans}
    out = [span]
    while out[-1].parent_id in by_id:
        out.append(by_id[out[-1].parent_id])
    return out


# -- Off by default -------------------------------------------------------------------------------------

def test_tracing_is_off_by_default_and_installs_nothing(monkeypatch):
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from pymilvus import MilvusClient

    monkeypatch.delenv("VISEARCH_OTLP_ENDPOINT", raising=False)
    settings = TracingSettings()
    assert settings.otlp_endpoint == "" and settings.trace_sample_ratio == 1.0
    assert tracing.setup("gateway", settings) is None
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.aio_client_interceptors() == []
    channel = grpc.insecure_channel("127.0.0.1:1")
    assert tracing.traced_channel(channel) is channel
    channel.close()
    assert not RedisInstrumentor().is_instrumented_by_opentelemetry
    assert not hasattr(MilvusClient.search, "__visearch_untraced__")
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # the API's proxy: no SDK behind it
    # An endpoint must say how to reach it (http:// plaintext, https:// TLS).
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingSettings(otlp_endpoint="collector:4317")
    with pytest.raises(ValueError):
        TracingSettings(trace_sample_ratio=1.5)


def test_a_service_exports_over_otlp_only_when_told(collector, services):
    """A real service process: off, it exports nothing even with the standard OTEL_* variables set;
    on, its server span reaches the collector named after the service, with the caller's request id."""
    from tests.conftest import channel

    cands = [rerank_pb2.Candidate(item_id="a", object_id="a#0", score=0.5)]
    services.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_TRACES_EXPORTER="otlp",
                        OTEL_BSP_SCHEDULE_DELAY="100")
    addr = services.start("rerank")
    with channel(addr) as ch:
        rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(candidates=cands, top_k=1), timeout=10,
                                                     metadata=(("x-request-id", "rid-off"),))
    assert services.procs.pop("rerank").stop() == 0  # the SDK flushes at exit: any span would be sent by now
    assert collector.spans == []

    services.env["VISEARCH_OTLP_ENDPOINT"] = collector.endpoint
    addr = services.start("rerank")
    with channel(addr) as ch:
        rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(candidates=cands, top_k=1), timeout=10,
                                                     metadata=(("x-request-id", "rid-on"),))
    wait_until(lambda: any(s.name == RERANK for s in collector.spans), 30, "the rerank span at the collector")
    [span] = collector.spans  # health checks (the fixture's, the service's own readiness) make none
    assert (span.service, span.kind, span.attributes[tracing.REQUEST_ID]) == ("rerank", "SERVER", "rid-on")
    assert span.parent_id == ""  # the caller sent no trace: the call served starts one


# -- In one process: the interceptors, the sampler, Redis, Celery's publish ------------------------------

class _Rerank(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, redis_url: str):
        import redis

        self.r = redis.Redis.from_url(redis_url)

    async def Rerank(self, request, context):
        await asyncio.to_thread(self.r.get, "visearch-tracing-test")
        return rerank_pb2.RerankResponse(method="none")


async def _serve_and_call(redis_url: str, port: int, tracer) -> None:
    settings = ServerSettings(auth="off", health_interval_seconds=0.05)
    started, stop = asyncio.Event(), asyncio.Event()
    service = Service("visearch.rerank.v1.RerankService", rerank_pb2_grpc.add_RerankServiceServicer_to_server,
                      _Rerank(redis_url))

    async def ready() -> bool:
        return True

    server = asyncio.create_task(serve([service], settings, port, ready, started=started, stop=stop))
    await started.wait()
    try:
        async with aio_channel(f"127.0.0.1:{port}", SecuritySettings(auth="off")) as ch:
            # The caller's own span: a request it serves (a span of another kind would start no trace).
            with tracer.start_as_current_span("caller aio", kind=trace.SpanKind.SERVER):
                await rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(), timeout=10,
                                                                   metadata=(("x-request-id", "rid-aio"),))
            # Outside any span of this process: its client span starts no trace, and says so to the server.
            await rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(), timeout=10)

        def blocking():
            with sync_channel(f"127.0.0.1:{port}", SecuritySettings(auth="off")) as ch, \
                    tracer.start_as_current_span("caller sync", kind=trace.SpanKind.SERVER):
                rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(), timeout=10)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # a caller that does not trace
                rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(), timeout=10)

        await asyncio.to_thread(blocking)
    finally:
        stop.set()
        await server


def test_grpc_calls_carry_the_trace_and_the_request_id(spans, redis_url):
    import redis

    redis.Redis.from_url(redis_url).ping()  # outside any call: starts no trace
    asyncio.run(_serve_and_call(redis_url, free_port(), spans.tracer))
    got = finished(spans)
    assert not [s for s in got if "Health" in s.name or "Reflection" in s.name], render(got)
    assert not [s for s in got if s.name == "PING"], "a Redis command outside any call must start no trace"
    roots = {s.name: s for s in got if not s.parent_id}
    assert set(roots) == {"caller aio", RERANK, "caller sync"}, render(got)
    for caller in ("caller aio", "caller sync"):
        tree = [s for s in got if s.trace_id == roots[caller].trace_id]
        client = next(s for s in tree if s.kind == "CLIENT" and s.name == RERANK)
        server = next(s for s in tree if s.kind == "SERVER")
        get = next(s for s in tree if s.name == "GET")
        assert [s.name for s in chain(tree, get)] == ["GET", RERANK, RERANK, caller], render(tree)
        assert chain(tree, server)[1] is client
        assert get.attributes["db.system"] == "redis" and get.kind == "CLIENT"
    aio_server = next(s for s in got if s.kind == "SERVER" and s.trace_id == roots["caller aio"].trace_id)
    assert aio_server.attributes[tracing.REQUEST_ID] == "rid-aio"
    # A call from a caller that does not trace starts a trace at the server, with the request id made there.
    assert len([s for s in got if s.kind == "SERVER" and s.name == RERANK]) == 3
    lone = roots[RERANK]
    assert lone.kind == "SERVER" and len(lone.attributes[tracing.REQUEST_ID]) == 16


def test_sampler_starts_traces_only_where_work_arrives():
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    for ratio, kept in ((1.0, True), (0.0, False)):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=tracing.sampler(ratio))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")
        for kind in (SpanKind.SERVER, SpanKind.CONSUMER):
            with tracer.start_as_current_span("entry", kind=kind):
                with tracer.start_as_current_span("inside", kind=SpanKind.CLIENT):
                    pass
        for kind in (SpanKind.CLIENT, SpanKind.INTERNAL, SpanKind.PRODUCER):
            with tracer.start_as_current_span("background", kind=kind):
                pass
        # A caller's sampled trace is followed whatever the ratio.
        remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        with tracer.start_as_current_span("served", context=trace.set_span_in_context(NonRecordingSpan(remote)),
                                          kind=SpanKind.SERVER):
            pass
        names = [s.name for s in exporter.get_finished_spans()]
        assert names == (["inside", "entry", "inside", "entry", "served"] if kept else ["served"]), (ratio, names)
        provider.shutdown()


def test_a_task_sent_by_name_carries_the_trace_in_its_headers(spans, redis_url):
    """The gateway sends ingestion tasks by name (it does not register them): the producer span is
    ended and its context rides in the message's headers, where the worker's instrumentation reads it."""
    import base64

    import redis
    from celery import Celery

    url = redis_url.rsplit("/", 1)[0] + "/15"  # a database of its own: no worker of another test sees it
    r = redis.Redis.from_url(url)
    r.flushdb()
    app = Celery("tracing-test", broker=url)
    try:
        with spans.tracer.start_as_current_span("IngestItems", kind=trace.SpanKind.SERVER) as call:
            app.send_task("visearch.ingest_batch", args=["job", "cat", []], queue="tracing-test",
                          headers={"request_id": "rid-task"})
        raw = r.lpop("tracing-test")
    finally:
        r.flushdb()
        app.close()
    message = json.loads(raw)
    headers = message["headers"]
    got = finished(spans)
    [producer] = [s for s in got if s.kind == "PRODUCER"]
    trace_id = f"{call.get_span_context().trace_id:032x}"
    assert producer.name == "apply_async/visearch.ingest_batch" and producer.trace_id == trace_id
    assert producer.parent_id == f"{call.get_span_context().span_id:016x}"
    assert producer.attributes["messaging.message.id"] == headers["id"]
    version, tid, parent, flags = headers["traceparent"].split("-")
    assert (version, tid, parent) == ("00", trace_id, producer.span_id) and int(flags, 16) & 1  # sampled
    assert headers["request_id"] == "rid-task" and json.loads(base64.b64decode(message["body"]))[0][0] == "job"
    # The broker's Redis commands are in the call's trace too.
    assert any(s.attributes.get("db.system") == "redis" and s.trace_id == trace_id for s in got), render(got)


# -- The mesh: one trace per search and per ingest, across every process ---------------------------------

def _cli(env: dict, *args: str) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "visearch.cli", *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"visearch {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, model_repo, grocery):
    """`visearch up` with VISEARCH_OTLP_ENDPOINT at a collector here; this process traces as the caller."""
    from visearch.mesh import load_state, read_admin_key

    c = Collector()
    c.server.start()
    data = tmp_path_factory.mktemp("traced-mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISEARCH_", "OTEL_"))}
    # Batches every 100 ms (5 s by default), so the spans arrive while the test waits.
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_OTLP_ENDPOINT=c.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    provider, exporter = memory_provider()
    try:
        _cli(env, "up")
        tracing.install(provider)
        gateway = {x["name"]: x for x in load_state(data)["components"]}["gateway"]["address"]
        with sync_channel(gateway, SecuritySettings(), key=read_admin_key(data)) as ch:
            from visearch.gateway.v1 import gateway_pb2_grpc

            yield {"collector": c, "memory": exporter, "tracer": provider.get_tracer("test"),
                   "stub": gateway_pb2_grpc.GatewayServiceStub(ch)}
    finally:
        tracing.uninstall()
        provider.shutdown()
        try:
            _cli(env, "down")
        finally:
            c.server.stop(0)


def _whole_trace(mesh: dict, root, needed: set[tuple[str, str, str]], what: str) -> list[Span]:
    """Every span of `root`'s trace, this process's and the services', once those in `needed`
    ((service, kind, name) triples) have all arrived at the collector."""
    trace_id = f"{root.get_span_context().trace_id:032x}"

    def spans() -> list[Span]:
        return [s for s in finished(mesh["memory"]) if s.trace_id == trace_id] + mesh["collector"].trace(trace_id)

    try:
        wait_until(lambda: needed <= {(s.service, s.kind, s.name) for s in spans()}, 60, what)
    except TimeoutError:
        raise AssertionError(f"{what}: missing {needed - {(s.service, s.kind, s.name) for s in spans()}}\n"
                             f"{render(spans())}") from None
    return spans()


GW = "/visearch.gateway.v1.GatewayService/"
DETECT, EMBED = "/visearch.detection.v1.DetectionService/Detect", "/visearch.embedding.v1.EmbeddingService/Embed"
EXTRACT = "/visearch.embedding.v1.EmbeddingService/ExtractLocal"


@pytest.fixture(scope="module")
def traced_ingest(traced_mesh, grocery) -> dict:
    """Three photos ingested into catalog "traced" in one IngestItems call made inside a trace here."""
    from visearch.gateway.v1 import gateway_pb2

    photos = [p for p in grocery["train"] if p.fine_name == "Arla-Standard-Milk"][:3]
    items = [gateway_pb2.IngestItem(item_id=p.path.stem, image=p.path.read_bytes()) for p in photos]
    stub = traced_mesh["stub"]
    with traced_mesh["tracer"].start_as_current_span("ingest", kind=trace.SpanKind.SERVER) as root:
        job = stub.IngestItems(gateway_pb2.IngestItemsRequest(catalog="traced", items=items), timeout=60,
                               metadata=(("x-request-id", "rid-traced-ingest"),)).job_id
    # Polled outside the trace: these calls start none.
    wait_until(lambda: stub.GetIngestJob(gateway_pb2.GetIngestJobRequest(job_id=job), timeout=10).job.pending == 0,
               120, "the ingest job")
    assert stub.GetIngestJob(gateway_pb2.GetIngestJobRequest(job_id=job), timeout=10).job.done == len(photos)
    return {"root": root}


@pytest.mark.mesh
def test_one_ingest_is_one_trace_through_the_queue(traced_mesh, traced_ingest):
    run = ("worker", "CONSUMER", "run/visearch.ingest_batch")
    got = _whole_trace(traced_mesh, traced_ingest["root"], {
        ("test", "CLIENT", GW + "IngestItems"), ("gateway", "SERVER", GW + "IngestItems"),
        ("gateway", "PRODUCER", "apply_async/visearch.ingest_batch"), run,
        ("worker", "CLIENT", DETECT), ("detection", "SERVER", DETECT),
        ("worker", "CLIENT", EMBED), ("embedding", "SERVER", EMBED)}, "the ingest's trace")
    tree = render(got)
    task = next(s for s in got if (s.service, s.kind, s.name) == run)
    # The task runs as a child of the call that queued it, through the message's headers.
    assert [(s.service, s.kind) for s in chain(got, task)] == [
        ("worker", "CONSUMER"), ("gateway", "PRODUCER"), ("gateway", "SERVER"), ("test", "CLIENT"),
        ("test", "SERVER")], tree
    assert task.attributes[tracing.REQUEST_ID] == "rid-traced-ingest", tree
    for s in got:
        if (s.service == "worker" or s.name in (DETECT, EMBED)) and s is not task:
            assert task in chain(got, s), f"{s.service} {s.name} is not under the task:\n{tree}"
    # The worker's writes to Milvus and its Redis bookkeeping, inside the task.
    ops = {s.attributes.get("db.operation.name") for s in got if s.service == "worker" and
           s.attributes.get("db.system.name") == "milvus"}
    assert "upsert" in ops, tree
    assert any(s.service == "worker" and s.attributes.get("db.system") == "redis" for s in got), tree


@pytest.mark.mesh
def test_one_search_is_one_trace_across_every_service(traced_mesh, traced_ingest, grocery):
    from visearch.gateway.v1 import gateway_pb2

    query = next(p for p in grocery["val"] if p.fine_name == "Arla-Standard-Milk")
    stub = traced_mesh["stub"]
    with traced_mesh["tracer"].start_as_current_span("search", kind=trace.SpanKind.SERVER) as root:
        hits = stub.Search(gateway_pb2.SearchRequest(catalog="traced", image=query.path.read_bytes(), top_k=3),
                           timeout=60, metadata=(("x-request-id", "rid-traced-search"),)).hits
    assert hits
    rerank = "/visearch.rerank.v1.RerankService/Rerank"
    got = _whole_trace(traced_mesh, root, {
        ("test", "CLIENT", GW + "Search"), ("gateway", "SERVER", GW + "Search"),
        ("gateway", "CLIENT", DETECT), ("detection", "SERVER", DETECT),
        ("gateway", "CLIENT", EMBED), ("embedding", "SERVER", EMBED),
        ("gateway", "CLIENT", EXTRACT), ("embedding", "SERVER", EXTRACT),  # the query's local features ("verify")
        ("gateway", "CLIENT", rerank), ("rerank", "SERVER", rerank)}, "the search's trace")
    tree = render(got)
    assert {s.service for s in got} == {"test", "gateway", "detection", "embedding", "rerank"}, tree
    search = next(s for s in got if (s.service, s.kind) == ("gateway", "SERVER"))
    assert [s.kind for s in chain(got, search)] == ["SERVER", "CLIENT", "SERVER"], tree
    for s in got:
        if s.service != "test":
            assert search in chain(got, s), f"{s.service} {s.name} is not under the gateway's Search:\n{tree}"
        if s.kind == "SERVER" and s.service != "test":  # the caller's request id, in every service
            assert s.attributes[tracing.REQUEST_ID] == "rid-traced-search", tree
    # Each service's server span is the child of the gateway's call to it.
    for s in got:
        if s.kind == "SERVER" and s.service not in ("test", "gateway"):
            parent = chain(got, s)[1]
            assert (parent.service, parent.kind, parent.name) == ("gateway", "CLIENT", s.name), tree
    # The vector search in Milvus, inside the call.
    assert any(s.service == "gateway" and s.attributes.get("db.operation.name") == "search" for s in got), tree


@pytest.mark.mesh
def test_streaming_calls_are_traced_and_still_answer(traced_mesh, traced_ingest):
    """The server-streaming ExportCatalog and the client-streaming ImportCatalog through the interceptors."""
    from visearch.gateway.v1 import gateway_pb2

    stub = traced_mesh["stub"]
    with traced_mesh["tracer"].start_as_current_span("copy", kind=trace.SpanKind.SERVER) as root:
        records = list(stub.ExportCatalog(gateway_pb2.ExportCatalogRequest(catalog="traced"), timeout=60))
        assert records[0].WhichOneof("record") == "header" and records[-1].WhichOneof("record") == "trailer"
        records[0].header.catalog = "traced_copy"
        copied = stub.ImportCatalog(iter(records), timeout=60)
    assert (copied.catalog, copied.items) == ("traced_copy", 3)
    got = _whole_trace(traced_mesh, root, {
        ("test", "CLIENT", GW + "ExportCatalog"), ("gateway", "SERVER", GW + "ExportCatalog"),
        ("test", "CLIENT", GW + "ImportCatalog"), ("gateway", "SERVER", GW + "ImportCatalog")}, "the copy's trace")
    for name in ("ExportCatalog", "ImportCatalog"):
        server = next(s for s in got if (s.service, s.kind, s.name) == ("gateway", "SERVER", GW + name))
        assert chain(got, server)[1].name == GW + name and chain(got, server)[-1].name == "copy", render(got)
        assert any(server in chain(got, s) and s.attributes.get("db.system.name") == "milvus" for s in got), render(got)
