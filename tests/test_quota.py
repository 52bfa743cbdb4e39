"""Per-key rate limits and the audit trail on real gateway processes, a real Redis and Milvus Lite.

The gateways run without detection, embedding or re-ranking (nothing listens at those addresses):
the calls used here (ListIngestJobs, ListCatalogs, IngestItems into an existing catalog,
DeleteItems) need only Redis and the vector store. Rates are chosen so that no token comes back
during a test's burst of calls (0.1/s: ten seconds a token), which keeps the counts exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import INTERNAL_TOKEN, Proc, channel, wait_until
from visearch.auth import KeyStore, Rate, hash_key, parse_rate
from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from visearch.grpcserver import retry_after
from visearch.inference import ModelMeta
from visearch.mesh import free_port
from visearch.quota import default_rate, format_wait
from visearch.settings import QuotaSettings, StoreSettings

ROOT = Path(__file__).resolve().parent.parent
META = ModelMeta(name="embedder", version="1", input_name="images", output_name="embeddings", input_size=32, dim=8)
CATALOG = "audit_shop"
# key id -> (key, entry fields)
KEYS = {
    "admin": ("vsk_test_admin", {"rate": {"per_second": 0}}),  # exempt from the gateway's default rate
    "fast": ("vsk_test_fast", {"rate": {"per_second": 1000, "burst": 1000}}),
    "slow": ("vsk_test_slow", {"rate": {"per_second": 0.1, "burst": 2}}),
    "shared": ("vsk_test_shared", {"rate": {"per_second": 0.1, "burst": 3}}),
    "retry": ("vsk_test_retry", {"rate": {"per_second": 0.5, "burst": 1}}),
    "limited": ("vsk_test_limited", {"rate": {"per_second": 0.1, "burst": 1}}),
    "streamer": ("vsk_test_streamer", {"rate": {"per_second": 0.1, "burst": 1}}),
    "reader": ("vsk_test_reader", {"actions": ["search", "read"], "rate": {"per_second": 0}}),
    "plain": ("vsk_test_plain", {}),  # the gateway's default rate
}
DEFAULT_RATE = {"VISEARCH_RATE_PER_SECOND": "0.1", "VISEARCH_RATE_BURST": "1"}


def key(name: str) -> str:
    return KEYS[name][0]


def write_keys(path: Path) -> Path:
    KeyStore.write(path, [{"id": name, "sha256": hash_key(k), "catalogs": ["*"], "actions": ["*"], **extra}
                          for name, (k, extra) in KEYS.items()])
    return path


def stub(address: str, api_key: str) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayServiceStub]:
    ch = channel(address, api_key)
    return ch, gateway_pb2_grpc.GatewayServiceStub(ch)


def outcome(fn) -> grpc.RpcError | None:
    """None when the call answered OK, else its error."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    return None


def code(err: grpc.RpcError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if err is None else err.code()


def list_jobs(address: str, api_key: str) -> grpc.RpcError | None:
    ch, s = stub(address, api_key)
    with ch:
        return outcome(lambda: s.ListIngestJobs(gateway_pb2.ListIngestJobsRequest(limit=1), timeout=10))


def list_catalogs(address: str, api_key: str) -> grpc.RpcError | None:
    ch, s = stub(address, api_key)
    with ch:
        return outcome(lambda: s.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=10))


def at_once(calls) -> list:
    """Run the calls concurrently; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda f: f(), calls))


class Gateways:
    """Real `python -m services.gateway` processes sharing one key file, Redis and Milvus."""

    def __init__(self, tmp: Path, redis_url: str, milvus_uri: str, keys_file: Path, audit_log: Path):
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: the calls used here need none of these
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
        self.env.update(VISEARCH_REDIS_URL=redis_url, VISEARCH_MILVUS_URI=milvus_uri,
                        VISEARCH_API_KEYS_FILE=str(keys_file), VISEARCH_INTERNAL_TOKEN=INTERNAL_TOKEN,
                        VISEARCH_DETECTION_ADDR=dead, VISEARCH_EMBEDDING_ADDR=dead, VISEARCH_RERANK_ADDR=dead,
                        VISEARCH_AUDIT_LOG=str(audit_log), VISEARCH_HEALTH_INTERVAL_SECONDS="1",
                        VISEARCH_GRACE_SECONDS="1", PYTHONUNBUFFERED="1", **DEFAULT_RATE)
        self.procs: list[Proc] = []

    def start(self, name: str, **env: str) -> tuple[str, Proc]:
        port = free_port()
        proc = Proc([sys.executable, "-m", "services.gateway"], self.tmp / f"{name}.log",
                    dict(self.env, VISEARCH_GATEWAY_PORT=str(port), **env))
        self.procs.append(proc)
        address = f"127.0.0.1:{port}"
        # Health stays NOT_SERVING (its model services are absent); it is up once it answers a call.
        wait_until(lambda: list_catalogs(address, INTERNAL_TOKEN) is None, 60, name, proc.p, proc.log)
        return address, proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, redis_url, milvus_uri):
    tmp = tmp_path_factory.mktemp("quota")
    keys_file = write_keys(tmp / "keys.json")
    audit_log = tmp / "logs" / "audit.log"
    from visearch.store import VectorStore

    store = VectorStore(StoreSettings(milvus_uri=milvus_uri))
    store.ensure_catalog(CATALOG, META)  # so an ingest needs no embedding service to make it
    store.close()
    # A database of its own in the session's Redis: the tasks these ingests queue reach no other test's worker.
    g = Gateways(tmp, redis_url.rsplit("/", 1)[0] + "/7", milvus_uri, keys_file, audit_log)
    try:
        first, _ = g.start("gateway-1")
        second, _ = g.start("gateway-2")
        yield {"first": first, "second": second, "audit": audit_log, "gateways": g}
    finally:
        g.stop()


def test_key_file_rates_and_the_default():
    assert parse_rate(None, "k") is None
    assert parse_rate({"per_second": 20, "burst": 40}, "k") == Rate(20, 40)
    assert parse_rate({"per_second": 0.5}, "k") == Rate(0.5, 1.0)  # burst at least one call
    assert parse_rate({"per_second": 0}, "k") == Rate(0, 0) and not Rate(0, 0).limited
    for bad in ({"per_second": -1}, {"per_second": 2, "burst": 0.5}, {"per_second": "x"}, {"rps": 3}, 5):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad, "key 'k'")
    assert default_rate(QuotaSettings()) is None  # off unless configured
    assert default_rate(QuotaSettings(rate_per_second=5)) == Rate(5, 5)
    assert default_rate(QuotaSettings(rate_per_second=5, rate_burst=12)) == Rate(5, 12)
    assert [format_wait(s) for s in (0.0, 0.001, 0.341, 2.5)] == ["0.01", "0.01", "0.35", "2.50"]


def test_a_key_over_its_rate_is_refused_with_retry_after_while_others_pass(gw):
    address = gw["first"]
    # Eight calls of "slow" (burst 2) and eight of "fast" at the same moment: exactly two of the slow
    # ones pass (one atomic step per call in Redis), every fast one does.
    results = at_once([lambda: list_jobs(address, key("slow"))] * 8 + [lambda: list_jobs(address, key("fast"))] * 8)
    slow, fast = results[:8], results[8:]
    assert [code(r) for r in fast] == [grpc.StatusCode.OK] * 8, [r.details() for r in fast if r]
    assert sorted(code(r).name for r in slow) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 6
    refused = [r for r in slow if r is not None]
    for err in refused:
        wait = retry_after(err)
        assert wait is not None and 0 < wait <= 10.0, err.trailing_metadata()  # one token takes 10 s at 0.1/s
        assert "key 'slow' is over its rate of 0.1 calls/s (burst 2)" in err.details(), err.details()
    # A key with no rate of its own gets the gateway's default (0.1/s, burst 1).
    assert [code(list_jobs(address, key("plain"))) for _ in range(2)] == [grpc.StatusCode.OK,
                                                                           grpc.StatusCode.RESOURCE_EXHAUSTED]
    # Never limited: the internal token, a key exempt from the default, and health checks.
    assert [code(list_jobs(address, k)) for k in [INTERNAL_TOKEN] * 4 + [key("admin")] * 4] == [grpc.StatusCode.OK] * 8
    ch = channel(address, key("slow"))
    with ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(4):
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # answers (NOT_SERVING here), never refused


def test_two_gateways_share_one_bucket(gw):
    # Ten calls of "shared" (burst 3) spread over both gateways at once: three pass in all, not three each.
    targets = [gw["first"], gw["second"]] * 5
    results = at_once([lambda a=a: list_jobs(a, key("shared")) for a in targets])
    assert sorted(code(r).name for r in results) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 7
    # And a key drained on one gateway is refused by the other.
    assert code(list_jobs(gw["second"], key("shared"))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(list_jobs(gw["first"], key("shared"))) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_sdk_waits_retry_after_and_succeeds(gw):
    from visearch.client import AsyncClient, Client

    address = gw["first"]
    # "retry": 0.5/s, burst 1. Without rate retries the refusal is raised as before, its trailer readable.
    with Client(address, api_key=key("retry"), max_rate_retries=0) as vs:
        vs.jobs(limit=1)
        with pytest.raises(grpc.RpcError) as err:
            vs.jobs(limit=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < retry_after(err.value) <= 2.01
    # With them (the default), the client waits what the gateway said and the call passes.
    with Client(address, api_key=key("retry")) as vs:
        t0 = time.monotonic()
        vs.jobs(limit=1)
        waited = time.monotonic() - t0
    assert 0.5 < waited < 15, waited  # it waited for a token (about 2 s), then passed

    async def run_async() -> float:
        async with AsyncClient(address, api_key=key("retry")) as avs:
            await avs.jobs(limit=1)  # drains the bucket (or waits for it)
            t0 = time.monotonic()
            await avs.jobs(limit=1)
            return time.monotonic() - t0

    waited = asyncio.run(run_async())
    assert 0.5 < waited < 15, waited


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_lines_for_ingest_delete_and_refused_calls(gw):
    address = gw["first"]
    image = b"\xff\xd8 not decoded by the gateway, only by a worker"
    items = [gateway_pb2.IngestItem(item_id=i, image=image) for i in ("a1", "a2")]
    ch, admin = stub(address, key("admin"))
    with ch:
        admin.IngestItems(gateway_pb2.IngestItemsRequest(catalog=CATALOG, items=items), timeout=30,
                          metadata=(("x-request-id", "audit-ingest"),))
        admin.DeleteItems(gateway_pb2.DeleteItemsRequest(catalog=CATALOG, item_ids=["a1", "a2", "a3"]), timeout=30,
                          metadata=(("x-request-id", "audit-delete"),))
        # An admin call whose dependency is down (the embedding service): audited with its outcome.
        err = outcome(lambda: admin.ReembedCatalog(gateway_pb2.ReembedCatalogRequest(catalog=CATALOG), timeout=30,
                                                   metadata=(("x-request-id", "audit-reembed"),)))
        assert code(err) == grpc.StatusCode.UNAVAILABLE, err
        admin.ListIngestJobs(gateway_pb2.ListIngestJobsRequest(limit=1), timeout=10,
                             metadata=(("x-request-id", "audit-read"),))  # a read: not audited
    ch, reader = stub(address, key("reader"))
    with ch:
        err = outcome(lambda: reader.IngestItems(gateway_pb2.IngestItemsRequest(catalog=CATALOG, items=items),
                                                 timeout=10, metadata=(("x-request-id", "audit-denied"),)))
        assert code(err) == grpc.StatusCode.PERMISSION_DENIED
    ch, limited = stub(address, key("limited"))  # burst 1: the second delete is over the rate
    with ch:
        for rid in ("audit-limited-1", "audit-limited-2"):
            err = outcome(lambda r=rid: limited.DeleteItems(gateway_pb2.DeleteItemsRequest(
                catalog=CATALOG, item_ids=["zz"]), timeout=10, metadata=(("x-request-id", r),)))
        assert code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # A refused call's line is written as its status goes out: it may land just after the caller has it.
    wanted = {"audit-ingest", "audit-delete", "audit-reembed", "audit-denied", "audit-limited-1", "audit-limited-2"}
    wait_until(lambda: wanted <= {line["request_id"] for line in audit_lines(gw["audit"])}, 60, "the audit lines")
    lines = audit_lines(gw["audit"])  # every line of both gateways parses: none interleaved
    by_rid = {line["request_id"]: line for line in lines}
    assert "audit-read" not in by_rid
    ingest = by_rid["audit-ingest"]
    assert {k: ingest[k] for k in ("key", "action", "method", "catalog", "items", "result")} == {
        "key": "admin", "action": "ingest", "method": "IngestItems", "catalog": CATALOG, "items": 2, "result": "OK"}
    assert ingest["job_id"] and ingest["ts"].endswith("Z") and ingest["peer"]
    delete = by_rid["audit-delete"]
    assert (delete["action"], delete["method"], delete["items"], delete["result"]) == ("delete", "DeleteItems", 3, "OK")
    reembed = by_rid["audit-reembed"]
    assert (reembed["action"], reembed["catalog"], reembed["result"]) == ("admin", CATALOG, "UNAVAILABLE")
    denied = by_rid["audit-denied"]
    assert (denied["key"], denied["action"], denied["result"], denied["items"]) == \
        ("reader", "ingest", "PERMISSION_DENIED", 2)
    assert "may not ingest" in denied["message"]
    assert by_rid["audit-limited-1"]["result"] == "OK"
    over = by_rid["audit-limited-2"]
    assert (over["key"], over["action"], over["catalog"], over["items"], over["result"]) == \
        ("limited", "delete", CATALOG, 1, "RESOURCE_EXHAUSTED")
    assert "over its rate" in over["message"]


def test_streaming_admin_calls_are_audited_and_limited(gw):
    """ExportCatalog streams its answer, ImportCatalog its request: audited and rate-limited alike."""
    address = gw["first"]
    ch, streamer = stub(address, key("streamer"))  # burst 1: the second export is over the rate
    with ch:
        records = list(streamer.ExportCatalog(gateway_pb2.ExportCatalogRequest(catalog=CATALOG), timeout=30,
                                              metadata=(("x-request-id", "audit-export"),)))
        assert records[0].WhichOneof("record") == "header" and records[-1].WhichOneof("record") == "trailer"
        err = outcome(lambda: list(streamer.ExportCatalog(gateway_pb2.ExportCatalogRequest(catalog=CATALOG),
                                                          timeout=30, metadata=(("x-request-id", "audit-export-2"),))))
        assert code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after(err) is not None
    ch, reader = stub(address, key("reader"))
    with ch:
        header = gateway_pb2.CatalogRecord(header=gateway_pb2.CatalogHeader(catalog="audit_restored"))
        err = outcome(lambda: reader.ImportCatalog(iter([header]), timeout=30,
                                                   metadata=(("x-request-id", "audit-import"),)))
        assert code(err) == grpc.StatusCode.PERMISSION_DENIED
    wanted = {"audit-export", "audit-export-2", "audit-import"}
    wait_until(lambda: wanted <= {line["request_id"] for line in audit_lines(gw["audit"])}, 60, "the audit lines")
    by_rid = {line["request_id"]: line for line in audit_lines(gw["audit"])}
    export = by_rid["audit-export"]
    assert (export["key"], export["action"], export["method"], export["catalog"], export["result"]) == \
        ("streamer", "admin", "ExportCatalog", CATALOG, "OK")
    assert by_rid["audit-export-2"]["result"] == "RESOURCE_EXHAUSTED"
    imp = by_rid["audit-import"]  # the catalog is the one its handler checked, read from the stream
    assert (imp["key"], imp["action"], imp["method"], imp["catalog"], imp["result"]) == \
        ("reader", "admin", "ImportCatalog", "audit_restored", "PERMISSION_DENIED")


def test_audit_lines_from_many_writers_never_interleave(tmp_path):
    path = tmp_path / "audit.log"
    code_ = ("import sys\nfrom visearch.audit import AuditLog\nlog = AuditLog(sys.argv[1])\n"
             "for n in range(400):\n    log.write({'writer': sys.argv[2], 'n': n, 'pad': 'x' * 3000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code_, str(path), str(w)], cwd=ROOT) for w in range(4)]
    assert [p.wait(120) for p in procs] == [0] * 4
    lines = audit_lines(path)
    assert len(lines) == 1600
    assert all(sorted(line["n"] for line in lines if line["writer"] == str(w)) == list(range(400)) for w in range(4))


def test_redis_down_lets_calls_pass_and_limits_come_back(gw, tmp_path):
    exe = shutil.which("redis-server")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    redis_proc = Proc(argv, tmp_path / "redis.log")
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        wait_until(lambda: redis.Redis.from_url(url).ping(), 10, "redis", redis_proc.p, redis_proc.log)
        address, proc = gw["gateways"].start("gateway-failopen", VISEARCH_REDIS_URL=url)
        # "plain" has the default rate (0.1/s, burst 1).
        assert [code(list_catalogs(address, key("plain"))) for _ in range(2)] == [
            grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
        redis_proc.stop()
        # Redis unreachable: every call passes, and the log says so once.
        assert [code(list_catalogs(address, key("plain"))) for _ in range(6)] == [grpc.StatusCode.OK] * 6
        time.sleep(1.2)  # past the limiter's 1 s between asking a failed Redis again
        assert [code(list_catalogs(address, key("plain"))) for _ in range(3)] == [grpc.StatusCode.OK] * 3

        def warnings() -> list[str]:
            return [line for line in proc.log.read_text().splitlines() if "rate limits are off" in line]

        assert len(warnings()) == 1, warnings()
        assert json.loads(warnings()[0])["level"] == "WARNING"
        # Redis back (an empty one: a fresh bucket): the limit applies again by itself.
        redis_proc = Proc(argv, tmp_path / "redis-2.log")
        wait_until(lambda: redis.Redis.from_url(url).ping(), 10, "redis", redis_proc.p, redis_proc.log)
        wait_until(lambda: code(list_catalogs(address, key("plain"))) == grpc.StatusCode.RESOURCE_EXHAUSTED, 30,
                   "the rate limit applying again")
        assert "rate limits apply again" in proc.log.read_text()
    finally:
        redis_proc.stop()
