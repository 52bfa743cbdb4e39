"""Milvus Lite's gRPC server with its writes made one at a time: the embedded vector store of the mesh.

Milvus Lite 3.2 (the pure-Python engine) answers each request on a thread of a pool, and its own
server says (milvus_lite/adapter/grpc/server.py) that "concurrent writes against the same
Collection are not" safe: two upserts at once take the same sequence numbers and interleave their
records in the write-ahead log. Nothing shows until the server dies before its next flush; then
recovery keeps what it can read. The mesh always writes concurrently (two worker processes, the
gateway's deletes), and a kill -9 of Milvus Lite mid-ingest lost a batch of 16 items that the job
had recorded as stored (tests/test_reliability.py); four writers and a kill -9 kept 64 of 2,560
items (tests/test_liteserver.py measures it against the plain server).

This runs the same engine and servicer with one lock around every request that changes state
(insert, upsert, delete, flush, and every change to collections, indexes, aliases, databases);
reads (search, query, describe, ...) run concurrently as before. A name it does not know is taken as
a write. SIGTERM stops the server (requests in flight drain) and closes the database, so a clean
stop leaves no log to replay.

    python -m visearch.liteserver --data-dir DIR --host 127.0.0.1 --port 19530
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

# Requests that change nothing (the Milvus protocol's read methods); every other one is serialised.
READS = frozenset({
    "Connect", "GetVersion", "CheckHealth", "HasCollection", "DescribeCollection", "ShowCollections", "Query",
    "Search", "HybridSearch", "DescribeIndex", "GetIndexState", "GetIndexBuildProgress", "GetLoadingProgress",
    "GetLoadState", "HasPartition", "ShowPartitions", "GetFlushState", "GetCollectionStatistics",
    "GetPartitionStatistics", "ListDatabases", "DescribeDatabase", "DescribeAlias", "ListAliases",
    "GetCompactionState", "GetPersistentSegmentInfo", "GetQuerySegmentInfo", "GetComponentStates",
})
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # as Milvus Lite's own server (and Milvus standalone)


def argv(data_dir: str | Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line that serves `data_dir` on host:port (the mesh and the tests start it so)."""
    return [sys.executable, "-m", "visearch.liteserver", "--data-dir", str(data_dir), "--host", host,
            "--port", str(port)]


class SerialWrites(grpc.ServerInterceptor):
    """One lock around every request whose method is not in READS."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method in READS or handler.unary_unary is None:
            return handler  # every Milvus method is unary-unary: the last test only guards the wrap
        inner = handler.unary_unary

        def serial(request, context):
            with self.lock:
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(serial, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def build(data_dir: str | Path, max_workers: int = 10):
    """(server, db): Milvus Lite's servicer on `data_dir`, writes serialised; not started, no port."""
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from milvus_lite.db import MilvusLite
    from pymilvus.grpc_gen import milvus_pb2_grpc

    db = MilvusLite(str(data_dir))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[SerialWrites()],
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
    return server, db


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m visearch.liteserver", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=19530)
    p.add_argument("--max-workers", type=int, default=10)
    a = p.parse_args(args)
    try:
        server, db = build(a.data_dir, a.max_workers)
    except Exception as exc:  # noqa: BLE001 - e.g. another server holds the folder's lock: one line
        print(f"milvus lite: cannot open {a.data_dir}: {exc}", file=sys.stderr)
        return 1
    addr = f"{a.host}:{a.port}"
    try:
        bound = server.add_insecure_port(addr)
    except RuntimeError:
        bound = 0
    if not bound:
        print(f"milvus lite: cannot listen on {addr}", file=sys.stderr)
        db.close()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"Milvus Lite (writes serialised) listening on {addr} (data_dir={a.data_dir!r})", flush=True)
    stop.wait()
    server.stop(grace=5).wait()
    db.close()
    print("Milvus Lite stopped: data closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
