"""A search's critical path as its trace shows it: `python -m bench.timeline [--catalog-size 10000]`.

A fresh local mesh (Milvus Lite, or --milvus-uri) and catalog as `bench.overhead` makes them, with
tracing on (VISEARCH_OTLP_ENDPOINT at an OTLP/gRPC receiver in this process). Each query photo is
searched with each --methods (default: the default method "verify", then "qe"), the methods taking
turns at going first, one search at a time. Every span of every search is kept; per method, each step
(the n-th span of one service, kind and name in the trace, e.g. the gateway's second Embed call) gets
its median start and end in ms from the start of the gateway's Search span. The rows, in order of
start, show what runs beside what: e.g. the detector and the full frame's forward together, then the
box's forward beside the query's local features, then the vector search and the re-rank.
`bench.breakdown` times each step alone; this shows them as one search runs them.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
SEARCH = "/visearch.gateway.v1.GatewayService/Search"


class Receiver:
    """An OTLP/gRPC trace receiver keeping (service, trace id, kind, name, start ns, end ns) of each span."""

    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[tuple] = []
        self.lock = threading.Lock()
        self._response = trace_service_pb2.ExportTraceServiceResponse
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        servicer = type("Servicer", (trace_service_pb2_grpc.TraceServiceServicer,), {"Export": self._export})()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, self.server)
        self.endpoint = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def _export(self, request, context):
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                got += [(service, s.trace_id.hex(), KINDS.get(s.kind, str(s.kind)), s.name, s.start_time_unix_nano,
                         s.end_time_unix_nano) for s in ss.spans]
        with self.lock:
            self.spans += got
        return self._response()

    def take(self) -> list[tuple]:
        with self.lock:
            out, self.spans = self.spans, []
        return out


def steps(spans: list[tuple], method_of: dict[str, str]) -> dict[str, dict[str, dict]]:
    """Per method, per step: its median start and end (ms after the gateway's Search began) and how
    many searches had it. `method_of`: trace id -> method."""
    by_trace: dict[str, list[tuple]] = {}
    for s in spans:
        by_trace.setdefault(s[1], []).append(s)
    found: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for trace_id, ss in by_trace.items():
        root = next((s for s in ss if s[0] == "gateway" and s[2] == "SERVER" and s[3] == SEARCH), None)
        if root is None or trace_id not in method_of:
            continue
        seen: dict[str, int] = {}
        for s in sorted(ss, key=lambda s: s[4]):
            name = f"{s[0]} {s[2].lower()} {s[3].rsplit('/', 1)[-1]}"
            n = seen[name] = seen.get(name, 0) + 1
            key = name if n == 1 else f"{name} #{n}"
            found.setdefault(method_of[trace_id], {}).setdefault(key, []).append(((s[4] - root[4]) / 1e6,
                                                                                (s[5] - root[4]) / 1e6))
    out: dict[str, dict[str, dict]] = {}
    for method, rows in found.items():
        med = {k: (float(np.median([a for a, _ in v])), float(np.median([b for _, b in v])), len(v)) for k, v in rows.items()}
        out[method] = {k: {"start_ms": round(a, 1), "end_ms": round(b, 1), "ms": round(b - a, 1), "searches": n}
                       for k, (a, b, n) in sorted(med.items(), key=lambda kv: (kv[1][0], kv[1][1]))}
    return out


def run(catalog_size: int, n_queries: int, rounds: int, out: Path | None, n_real: int = 400,
        methods: tuple[str, ...] = ("verify", "qe"), milvus_uri: str = "", progress=print) -> dict:
    from bench.common import grocery_catalog_and_queries, mesh_up, write_result
    from bench.overhead import fill_catalog
    from visearch import mesh
    from visearch.client import Client
    from visearch.settings import StoreSettings

    real, val = grocery_catalog_and_queries(catalog_size, n_real, n_queries)
    queries = [p.path.read_bytes() for p in val]
    receiver = Receiver()
    receiver.server.start()
    sequence: list[str] = []  # the method of each search, in order
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "mesh"
            env = {"VISEARCH_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
            state = mesh_up(data, {**env, **({"VISEARCH_MILVUS_URI": milvus_uri} if milvus_uri else {})})
            try:
                key = mesh.read_admin_key(data)
                catalog = f"timeline{int(time.time())}"
                items = fill_catalog(state, key, catalog, real, catalog_size, tmp, progress)
                time.sleep(StoreSettings.model_fields["bounded_window_seconds"].default + 1.5)
                with Client(state["gateway"], api_key=key, timeout=60) as vs:
                    for q in queries[:3]:  # warm-up
                        vs.search(q, catalog=catalog)
                    time.sleep(1.0)
                    receiver.take()
                    for r in range(rounds):
                        for i, q in enumerate(queries):
                            order = list(methods) if (r * len(queries) + i) % 2 == 0 else list(reversed(methods))
                            for m in order:
                                vs.search(q, catalog=catalog, rerank=m)
                                sequence.append(m)
                time.sleep(2.0)  # the batch processors' last exports
            finally:
                mesh.down(data, log=lambda m: None)
    finally:
        receiver.server.stop(0)
    spans = receiver.take()
    # One search at a time: the gateway's Search spans in order of start are the searches in order.
    searches = sorted((s for s in spans if s[0] == "gateway" and s[2] == "SERVER" and s[3] == SEARCH),
                      key=lambda s: s[4])
    if len(searches) != len(sequence):
        raise SystemExit(f"{len(searches)} traced searches for {len(sequence)} made: spans were lost")
    method_of = {s[1]: m for s, m in zip(searches, sequence, strict=True)}
    result = {"store": "Milvus server " + milvus_uri if milvus_uri else "Milvus Lite", "catalog_items": items,
              "queries": len(queries), "rounds": rounds, "steps": steps(spans, method_of)}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['store']}: catalog of {r['catalog_items']} items, {r['queries']} grocery val photos x "
             f"{r['rounds']} rounds; ms from the start of the gateway's Search span, medians.", ""]
    for method, rows in r["steps"].items():
        lines += [f"`--rerank {method}`", "", "| step (service, kind, call) | searches | start | end | ms |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['searches']} | {v['start_ms']} | {v['end_ms']} | {v['ms']} |" for k, v in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.common import mesh_bench_args

    ap = mesh_bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 30, 400, Path("runs/timeline"))
    ap.add_argument("--methods", default="verify,qe", help="re-rank methods, comma-separated")
    args = ap.parse_args(argv)
    result = run(args.catalog_size, args.queries, args.rounds, args.out, args.real,
                 tuple(m for m in args.methods.split(",") if m), args.milvus_uri)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
