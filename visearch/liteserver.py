"""Milvus Lite's gRPC server with its writes made one at a time: the embedded vector store of the mesh.

Milvus Lite 3.2 (the pure-Python engine) answers each request on a thread of a pool, and its own
server says (milvus_lite/adapter/grpc/server.py) that "concurrent writes against the same
Collection are not" safe: two upserts at once take the same sequence numbers and interleave their
records in the write-ahead log. Nothing shows until the server dies before its next flush; then
recovery keeps what it can read. The mesh always writes concurrently (two worker processes, the
gateway's deletes), and a kill -9 of Milvus Lite mid-ingest lost a batch of 16 items that the job
had recorded as stored (tests/test_reliability.py); four writers and a kill -9 kept 64 of 2,560
items with the plain server (measured by hand: tests/test_liteserver.py runs the same scenario on
this one, and fails with 64 of 1,280 when pointed at the plain server).

This runs the same engine and servicer behind one read-write lock: every request that changes
state (insert, upsert, delete, flush, and every change to collections, indexes, aliases, databases)
runs alone, reads (search, query, describe, ...) run together between them. A name it does not know
is taken as a write. Reads wait for writes because Milvus Lite's flush (an explicit one, or one an
insert starts when its memtable is full) takes the rows out of the memtable before their segment is
in place: a read between the two missed every row written since the last flush (tests: 3-9 of
about 500 reads during an ingest that flushes after each batch). SIGTERM stops the server
(requests in flight drain) and closes the database, so a clean stop leaves no log to replay.

    python -m visearch.liteserver --data-dir DIR --host 127.0.0.1 --port 19530
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from contextlib import contextmanager
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


class ReadWriteLock:
    """Many readers at once or one writer alone; a writer waiting holds new readers back, so a
    stream of searches cannot starve an ingest."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class SerialWrites(grpc.ServerInterceptor):
    """Every request whose method is not in READS runs alone; reads run together between them."""

    def __init__(self) -> None:
        self.lock = ReadWriteLock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # every Milvus method is unary-unary: this only guards the wrap
        inner = handler.unary_unary
        hold = self.lock.read if handler_call_details.method.rsplit("/", 1)[-1] in READS else self.lock.write

        def held(request, context):
            with hold():
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(held, request_deserializer=handler.request_deserializer,
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
