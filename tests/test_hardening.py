"""Hardening, on a real mesh, tried as a hostile client would (docs/RELIABILITY.md, "Hostile clients"):
identifiers are data, a restarted Milvus heals under running services, every request of a job
counts, files and staged bytes are bounded, and the small ones (long names, leaky denials, the
console's sockets and headers, oversized queries)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from PIL import Image

from tests.conftest import free_port, wait_until
from tests.test_mesh import cli
from visearch import mesh
from visearch.auth import KeyStore, hash_key
from visearch.client import Client
from visearch.gateway.v1 import gateway_pb2
from visearch.jobs import Jobs
from visearch.queue import INGEST_QUEUE

pytestmark = pytest.mark.mesh
ROOT = Path(__file__).resolve().parents[1]
INGEST_KEY = "vsk_ingest_only_key_for_tests"
OTHER_KEY = "vsk_other_catalog_reader_for_tests"
# Ids from every class that broke expressions: quotes closing the literal and rewriting it,
# backslashes, brackets, non-ASCII of 2-4 bytes, and the longest id allowed (248 bytes).
HOSTILE_IDS = [
    "x' or object_id not in ['", 'x" or object_id not in ["', "a\\", "\\'", "it's", 'say "cheese"',
    "[brackets]", "Ærø-ü-中-😀", "x'] or item_id like '%", "é" * 124, "a" * 248, "tab\u007fdel",
]


def status_of(fn):
    try:
        return "OK", fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


@pytest.fixture(scope="module")
def hmesh(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("hardening")
    root = data / "root"
    root.mkdir()
    keys_file, _ = mesh.ensure_credentials(data)
    entries = json.loads(keys_file.read_text())["keys"]
    entries += [{"id": "ingester", "sha256": hash_key(INGEST_KEY), "catalogs": ["shop"], "actions": ["ingest"]},
                {"id": "other-reader", "sha256": hash_key(OTHER_KEY), "catalogs": ["other"], "actions": ["read"]}]
    KeyStore.write(keys_file, entries)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_INGEST_MAX_OBJECTS="1", VISEARCH_VISIBILITY_TIMEOUT="20",
               VISEARCH_HEALTH_INTERVAL_SECONDS="0.5", VISEARCH_IDLE_TIMEOUT_SECONDS="2",
               VISEARCH_MAX_CONNECTIONS="8")
    cli(env, "up", "--ingest-root", str(root))
    state = mesh.load_state(data)
    # One photo per product (and then more of each): a photo's own item is its best match.
    firsts: dict[int, Path] = {}
    for p in grocery["train"]:
        if p.is_product:
            firsts.setdefault(p.fine_id, p.path)
    photos = list(firsts.values())[:28] + [p.path for p in grocery["train"] if p.is_product][:12]
    admin = Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=120)
    shop = {f"shop{n}": p for n, p in enumerate(photos[:8])}
    admin.wait(admin.ingest_paths(shop, catalog="shop", metadata={i: {"brand": "base"} for i in shop},
                                  regions="float").job_id, 300)
    port = free_port()
    log = open(data / "console.log", "wb")
    console = subprocess.Popen([sys.executable, "-m", "visearch.cli", "console", "--port", str(port)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    m = {"env": env, "data": data, "root": root, "state": state, "admin": admin, "photos": photos, "shop": shop,
         "comps": {c["name"]: c for c in state["components"]}, "console": f"http://127.0.0.1:{port}",
         "redis": redis.Redis.from_url(state["settings"]["VISEARCH_REDIS_URL"])}
    try:
        yield m
    finally:
        console.terminate()
        console.wait(15)
        log.close()
        admin.close()
        cli(env, "down", check=False)


def shop_state(m) -> dict[str, list[str]]:
    """Every item of catalog "shop" with its object ids, read straight from Milvus."""
    from visearch.store import milvus_client

    client = milvus_client(m["comps"]["milvus"]["address"])
    try:
        rows = client.query("vs_shop", filter='object_id != ""', output_fields=["item_id", "object_id"], limit=16000)
    finally:
        client.close()
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["item_id"], []).append(r["object_id"])
    return {k: sorted(v) for k, v in out.items()}


def test_an_id_cannot_rewrite_an_expression(hmesh):
    """The critical defect: a key that may only ingest emptied a catalog with an id that closed its
    quote, and DeleteItems of such an id deleted every item. Now each hostile id is stored, counted,
    read, searched, re-ranked and deleted as itself, and nothing else in the catalog changes."""
    admin, photos = hmesh["admin"], hmesh["photos"]
    before = shop_state(hmesh)
    assert set(before) == set(hmesh["shop"])
    with Client(hmesh["state"]["gateway"], api_key=INGEST_KEY, timeout=120) as ingester:
        items = [gateway_pb2.IngestItem(item_id=i, image=photos[8 + n].read_bytes(), metadata={"brand": i, "n": str(n)})
                 for n, i in enumerate(HOSTILE_IDS)]
        job = ingester.ingest(items, catalog="shop").job_id
    st = admin.wait(job, 300)
    assert (st.submitted, st.done, st.failed) == (len(HOSTILE_IDS), len(HOSTILE_IDS), 0), list(st.failures)
    after = shop_state(hmesh)
    assert {k: v for k, v in after.items() if k in before} == before, "no item of the catalog was touched"
    assert set(after) == set(before) | set(HOSTILE_IDS)
    for n, item_id in enumerate(HOSTILE_IDS):
        got = admin.get(item_id, catalog="shop")
        assert got.item_id == item_id and got.metadata["brand"] == item_id
        assert [o.object_id for o in got.objects] == after[item_id]
        photo = photos[8 + n].read_bytes()
        # Its own photo finds it first on its global vector and on verified features; query
        # expansion (which averages in its neighbours) and regions (which match parts) rank it among
        # the others but never lose it (the catalog's crops have a margin the query's lacks, so an
        # identical photo is not always first there), whatever each method reads from the store; a
        # filter on its (hostile, non-ASCII) metadata value finds exactly it.
        for method in ("verify", "none", "qe", "regions", "qam"):
            hits = admin.search(photo, catalog="shop", top_k=len(after), rerank=method).hits
            ids = [h.item_id for h in hits]
            assert len(ids) == len(set(ids)) and set(ids) <= set(after), (method, ids)
            assert (ids[0] == item_id) if method in ("verify", "none") else item_id in ids, (item_id, method, ids)
        assert [h.item_id for h in admin.search(photo, catalog="shop", filters={"brand": item_id}).hits] == [item_id]
    assert admin.delete([HOSTILE_IDS[0], HOSTILE_IDS[1]], catalog="shop") == 2
    assert admin.delete(["' or object_id != '"], catalog="shop") == 0
    assert admin.delete(HOSTILE_IDS[2:], catalog="shop") == len(HOSTILE_IDS) - 2
    assert shop_state(hmesh) == before, "exactly the hostile items are gone, every other item is whole"


@pytest.mark.parametrize("metadata, filters, reason", [
    ({"a]": "v"}, {}, "metadata key 'a]' is invalid"),
    ({'"][': "v"}, {}, "no brackets, quotes"),
    ({"k": "v" * 5000}, {}, "at most 2048"),
    ({}, {"x\"][\"y": "v"}, "filter key"),
    ({}, {f"k{n}": "v" for n in range(20)}, "at most 16"),
])
def test_keys_that_cannot_be_filtered_on_are_refused_with_a_reason(hmesh, metadata, filters, reason):
    """JSON-path keys are parsed by hand by Milvus 2.3 servers (a key `][` crashed the proxy):
    refused at the door, with the reason, before anything is stored or searched."""
    admin, photo = hmesh["admin"], hmesh["photos"][0].read_bytes()
    if metadata:
        fn = lambda: admin.ingest([gateway_pb2.IngestItem(item_id="k", image=photo, metadata=metadata)], catalog="shop")  # noqa: E731
    else:
        fn = lambda: admin.search(photo, catalog="shop", filters=filters)  # noqa: E731
    code, details = status_of(fn)
    assert code == "INVALID_ARGUMENT" and reason in details, (code, details)


def test_every_request_of_a_job_counts(hmesh):
    """Five IngestItems requests with one job_id and the same ids: the job is done only once the
    last submission of every item is stored, and what is stored is the last submission."""
    admin, photos = hmesh["admin"], hmesh["photos"]
    ids = [f"round{n}" for n in range(30)]
    job = ""
    for r in range(1, 6):
        items = [gateway_pb2.IngestItem(item_id=i, image=photos[n % len(photos)].read_bytes(), metadata={"round": str(r)})
                 for n, i in enumerate(ids)]
        job = admin.ingest(items, catalog="rounds", job_id=job).job_id
    st = admin.wait(job, 600)
    assert (st.submitted, st.done, st.failed, st.pending) == (30, 30, 0, 0)
    assert {admin.get(i, catalog="rounds").metadata["round"] for i in ids} == {"5"}, \
        "the job said done before its last round was stored"
    assert hmesh["redis"].llen(INGEST_QUEUE) == 0, "no task of the job is still queued"


def test_files_are_read_bounded_and_typed(hmesh):
    """Paths inside the ingest roots that are not plain images of a bounded size are refused at the
    gateway with the reason, and files swapped after the gateway's check (for a FIFO, a sparse
    2 GB file, a symlink out of the roots, a folder on the way turned into a symlink) fail their
    item at the worker, which never blocks or reads them, while the rest of the batch is stored."""
    root, admin, photo = hmesh["root"], hmesh["admin"], hmesh["photos"][0]
    os.mkfifo(root / "fifo.jpg")
    with open(root / "sparse.jpg", "wb") as f:
        f.truncate(2 << 30)
    (root / "dir.jpg").mkdir()
    long_name = root / ("n" * 300 + ".jpg")
    for path, reason in ((root / "fifo.jpg", "not a regular file"), (root / "sparse.jpg", "over the limit"),
                         (root / "dir.jpg", "not a regular file"), (long_name, "cannot be read: File name too long")):
        code, details = status_of(lambda p=path: admin.ingest([gateway_pb2.IngestItem(item_id="f", uri=str(p))],
                                                              catalog="files"))
        assert code == "INVALID_ARGUMENT" and reason in details, (path.name[:20], code, details)

    # Files swapped between the gateway's check and the worker's read: the worker is stopped while
    # the items are queued, the files are swapped, the worker comes back.
    outside = hmesh["data"] / "outside"
    outside.mkdir()
    shutil.copy(photo, outside / "secret.jpg")
    (root / "sub").mkdir()
    names = ["good", "to_fifo", "to_sparse", "to_symlink", "via_dir"]
    for n in names:
        shutil.copy(photo, (root / "sub" if n == "via_dir" else root) / f"{n}.jpg")
    worker = next(c for c in mesh.load_state(hmesh["data"])["components"] if c["name"] == "worker")
    mesh.stop_pid(worker["pid"], 15)
    try:
        items = [gateway_pb2.IngestItem(item_id=n, uri=str((root / "sub" if n == "via_dir" else root) / f"{n}.jpg"))
                 for n in names]
        job = admin.ingest(items, catalog="files").job_id
        (root / "to_fifo.jpg").unlink()
        os.mkfifo(root / "to_fifo.jpg")
        with open(root / "to_sparse.jpg", "r+b") as f:
            f.truncate(2 << 30)
        (root / "to_symlink.jpg").unlink()
        (root / "to_symlink.jpg").symlink_to(outside / "secret.jpg")
        shutil.move(root / "sub", hmesh["data"] / "sub-moved")
        shutil.copy(photo, outside / "via_dir.jpg")
        (root / "sub").symlink_to(outside)
    finally:
        mesh.restart(hmesh["data"], "worker")
    st = admin.wait(job, 300)
    failures = {f.item_id: f.reason for f in st.failures}
    assert (st.done, st.failed) == (1, 4), failures
    assert "not a regular file" in failures["to_fifo"]
    assert "over the limit" in failures["to_sparse"]
    assert "symbolic link" in failures["to_symlink"]
    assert "outside the folders" in failures["via_dir"]
    assert admin.get("good", catalog="files").item_id == "good"


def test_staged_bytes_are_bounded_and_redis_never_evicts(hmesh):
    r, admin, photo = hmesh["redis"], hmesh["admin"], hmesh["photos"][0].read_bytes()
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert int(r.config_get("maxmemory")["maxmemory"]) > 0
    big = photo + b"\0" * (33 * 1024 * 1024 - len(photo))
    code, details = status_of(lambda: admin.ingest([gateway_pb2.IngestItem(item_id="big", image=big)], catalog="staged"))
    assert code == "INVALID_ARGUMENT" and "over the limit" in details, details
    # A Redis near its cap: image bytes are refused before anything is staged.
    cap = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 4 * 1024 * 1024)
    try:
        items = [gateway_pb2.IngestItem(item_id=f"s{n}", image=photo + bytes(2 * 1024 * 1024)) for n in range(4)]
        code, details = status_of(lambda: admin.ingest(items, catalog="staged"))
        assert code == "RESOURCE_EXHAUSTED" and "retry later" in details, (code, details)
    finally:
        r.config_set("maxmemory", cap)
    assert not list(r.scan_iter("vs:blob:*")), "nothing was staged"


def test_small_ones(hmesh):
    admin, photo = hmesh["admin"], hmesh["photos"][0].read_bytes()
    # A 60 MB query is refused by the gateway itself, not forwarded to detection.
    code, details = status_of(lambda: admin.search(photo + bytes(60 * 1024 * 1024), catalog="shop"))
    assert code == "INVALID_ARGUMENT" and details.startswith("query image is"), details
    # A denied job lookup does not name the job's catalog.
    job = admin.ingest([gateway_pb2.IngestItem(item_id="one", image=photo)], catalog="shop").job_id
    with Client(hmesh["state"]["gateway"], api_key=OTHER_KEY, timeout=30, retries=0) as other:
        code, details = status_of(lambda: other.job(job))
    assert code == "PERMISSION_DENIED" and "shop" not in details, details
    admin.wait(job, 120)
    admin.delete(["one"], catalog="shop")


def test_more_of_the_same_classes(hmesh):
    """Cases of the same kinds as the ones reported: names that end in a newline or loop, ids that
    would address another Redis key, strings long enough to overflow a status message, bytes that
    are not UTF-8, an unknown re-rank method, and batches whose images together exceed a message."""
    from visearch.gateway.v1 import gateway_pb2_grpc
    from visearch.grpcserver import sync_channel
    from visearch.settings import SecuritySettings

    admin, root, photo = hmesh["admin"], hmesh["root"], hmesh["photos"][0].read_bytes()
    (root / "l1").symlink_to(root / "l2")
    (root / "l2").symlink_to(root / "l1")
    job = admin.ingest([gateway_pb2.IngestItem(item_id="x", image=photo)], catalog="shop").job_id
    admin.wait(job, 120)
    cases = [
        ("catalog ending in a newline", lambda: admin.search(photo, catalog="shop\n"), "INVALID_ARGUMENT", "catalog name"),
        ("symlink loop", lambda: admin.ingest([gateway_pb2.IngestItem(item_id="l", uri=str(root / "l1" / "x.jpg"))],
                                              catalog="shop"), "INVALID_ARGUMENT", "cannot be read"),
        ("job id naming another key", lambda: admin.job(job + ":items"), "INVALID_ARGUMENT", "job id"),
        ("job id naming another key", lambda: admin.job(job + ":seq"), "INVALID_ARGUMENT", "job id"),
        ("unicode job id", lambda: admin.ingest([gateway_pb2.IngestItem(item_id="u", image=photo)], catalog="shop",
                                                job_id="\u0661\u0662"), "INVALID_ARGUMENT", "job id"),
        ("20k-character catalog", lambda: admin.search(photo, catalog="é" * 20000), "INVALID_ARGUMENT", "catalog name"),
        ("unknown re-rank method", lambda: admin.search(photo, catalog="shop", rerank="x" * 20000), "INVALID_ARGUMENT",
         "re-rank method"),
        ("unicode model version", lambda: admin.reembed("shop", model_version="\u00b2"), "INVALID_ARGUMENT",
         "must be a number"),
    ]
    for name, fn, expected, reason in cases:
        code, details = status_of(fn)
        assert code == expected and reason in details and len(details) < 1100, (name, code, details[:200])
    # A string field that is not UTF-8: field 1 (catalog) of a SearchRequest, length 2, bytes ff fe.
    key = mesh.read_admin_key(hmesh["data"])
    with sync_channel(hmesh["state"]["gateway"], SecuritySettings(), key=key) as ch:
        raw = ch.unary_unary("/visearch.gateway.v1.GatewayService/Search", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
        code, details = status_of(lambda: raw(b"\x0a\x02\xff\xfe", timeout=10))
    assert code == "INVALID_ARGUMENT" and "UTF-8" in details, (code, details)
    assert gateway_pb2_grpc  # the stubs module is the one the SDK uses
    # Images whose bytes together exceed a gRPC message (64 MiB): each 20 MiB (valid JPEGs with
    # padding after their end), two per batch, two objects each; and a per-object search of one.
    big = photo + bytes(20 * 1024 * 1024)
    job = admin.ingest([gateway_pb2.IngestItem(item_id=f"big{n}", image=big) for n in range(2)], catalog="bigs").job_id
    st = admin.wait(job, 300)
    assert (st.done, st.failed) == (2, 0), list(st.failures)
    res = admin.search(big, catalog="bigs", per_object=True)
    assert res.hits and res.hits[0].item_id in ("big0", "big1")


def test_console_sockets_and_headers(hmesh):
    url = hmesh["console"]
    key = mesh.read_admin_key(hmesh["data"])

    def get(path: str) -> int:
        try:
            return urllib.request.urlopen(url + path, timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    wait_until(lambda: get("/healthz") == 200, 60, "console")
    assert get("/static/" + "a" * 300 + ".js") == 404, "a long name is not found, not a 500"
    # Idle connections are closed after the idle timeout (2 s here) and never hold the server: more
    # of them than its connection limit (8 here), and a real request is answered once they are gone.
    idle = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) for _ in range(20)]
    try:
        time.sleep(3)
        answers = []
        for s in idle:  # each closed by the server: idle past its timeout, or turned away with a 503
            got = b""
            while chunk := s.recv(1 << 16):
                got += chunk
            answers.append(got.split(b"\r\n", 1)[0])
        assert set(answers) <= {b"", b"HTTP/1.1 503 Service Unavailable"} and answers.count(b"") >= 8, answers
        assert get("/healthz") == 200
    finally:
        for s in idle:
            s.close()

    def raw(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
            s.sendall(request)
            out = b""
            while chunk := s.recv(1 << 16):
                out += chunk
            return out

    buf = io.BytesIO()
    Image.open(hmesh["photos"][0]).save(buf, "JPEG")
    body = buf.getvalue()
    two = (f"POST /api/search?catalog=shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
           f"Content-Length: 4\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    assert raw(two).startswith(b"HTTP/1.1 400"), "two Content-Length headers are refused"
    chunked = (f"POST /api/search?catalog=shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").encode()
    assert raw(chunked).startswith(b"HTTP/1.1 501")
    get_body = "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw(get_body.encode()).startswith(b"HTTP/1.1 400"), "a GET with a body is refused, never parsed on"
    # Headers are read as Latin-1, where superscript digits pass str.isdigit() and fail int().
    digits = (b"POST /api/search?catalog=shop HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\xb3\r\n"
              b"Connection: close\r\n\r\n")
    assert raw(digits).startswith(b"HTTP/1.1 400")
    one = (f"POST /api/search?catalog=shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    assert raw(one).startswith(b"HTTP/1.1 200")


def test_a_restarted_milvus_heals_under_running_services(hmesh):
    """Milvus Lite killed (-9) in the middle of an ingest and started again: the running gateway,
    re-rank service and worker load its released collections by themselves; searches and gets
    answer again, health is SERVING, and the job ends with every item done once. Last in this
    module: it restarts the mesh's Milvus."""
    admin, photos = hmesh["admin"], hmesh["photos"]
    pids = {c["name"]: c["pid"] for c in mesh.load_state(hmesh["data"])["components"] if c["name"] != "milvus"}
    query = photos[0].read_bytes()
    assert admin.search(query, catalog="shop", top_k=3).hits[0].item_id == "shop0"
    items = {f"heal{n}": p for n, p in enumerate(photos[:32])}
    job = admin.ingest_paths(items, catalog="healing").job_id
    jobs = Jobs.from_url(hmesh["state"]["settings"]["VISEARCH_REDIS_URL"], 60)
    wait_until(lambda: jobs.status(job).done >= 4, 300, "first items stored")
    milvus = next(c for c in mesh.load_state(hmesh["data"])["components"] if c["name"] == "milvus")
    os.killpg(milvus["pid"], 9)
    wait_until(lambda: not mesh.alive(milvus["pid"]), 10, "milvus gone")
    with Client(hmesh["state"]["gateway"], api_key=mesh.read_admin_key(hmesh["data"]), timeout=10, retries=0) as c:
        code, _ = status_of(lambda: c.search(query, catalog="shop"))
    assert code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), code
    time.sleep(3)
    mesh.restart(hmesh["data"], "milvus")
    st = admin.wait(job, 600)
    assert (st.submitted, st.done, st.failed, st.pending) == (32, 32, 0, 0), list(st.failures)
    wait_until(lambda: admin.search(query, catalog="shop", top_k=3).hits[0].item_id == "shop0", 60,
               "searches answer again")
    assert admin.search(query, catalog="shop", top_k=3, rerank="none").hits[0].item_id == "shop0"
    for method in ("qe", "regions"):
        assert "shop0" in [h.item_id for h in admin.search(query, catalog="shop", top_k=8, rerank=method).hits]
    assert admin.get("shop3", catalog="shop").item_id == "shop3"
    got = admin.search(photos[5].read_bytes(), catalog="healing", top_k=1).hits
    assert got[0].item_id == "heal5"
    from visearch.store import milvus_client

    client = milvus_client(mesh.load_state(hmesh["data"])["settings"]["VISEARCH_MILVUS_URI"])
    rows = client.query("vs_healing", filter='object_id != ""', output_fields=["item_id", "object_id"], limit=16000)
    client.close()
    assert {r["item_id"] for r in rows} == set(items) and len({r["object_id"] for r in rows}) == len(rows)
    now = {c["name"]: c["pid"] for c in mesh.load_state(hmesh["data"])["components"] if c["name"] != "milvus"}
    assert now == pids, "nothing but Milvus was restarted"
    st = json.loads(cli(hmesh["env"], "status", "--json").stdout)
    assert all(c["health"] == "SERVING" for c in st["components"]), st
