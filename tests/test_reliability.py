"""Hostile input, dependency faults, crashes and overload, on a real mesh.

One mesh with tight limits (8 MB messages, 4 calls in flight, a 10 s visibility
timeout so a dead worker's batch comes back within seconds).
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_until
from tests.test_mesh import cli
from visearch import mesh
from visearch.client import GatewayClient
from visearch.demo import write_manifest
from visearch.gateway.v1 import gateway_pb2
from visearch.jobs import Jobs

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("reliability")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_MAX_MESSAGE_BYTES=str(8 * 1024 * 1024), VISEARCH_MAX_IN_FLIGHT="4",
               VISEARCH_VISIBILITY_TIMEOUT="10", VISEARCH_HEALTH_INTERVAL_SECONDS="0.5",
               # Items stay multi-object (full frame + the best detection) at half the default's cost.
               VISEARCH_INGEST_MAX_OBJECTS="1")
    cli(env, "up")
    try:  # the mesh goes down whatever fails after it came up (a failed setup included)
        state = mesh.load_state(data)
        m = {"env": env, "data": data, "state": state, "comps": {c["name"]: c for c in state["components"]}}
        m["client"] = GatewayClient(state["gateway"], key=mesh.read_admin_key(data), timeout=60)
        photos = [p for p in grocery["train"] if p.is_product][:24]
        res = json.loads(cli(env, "ingest", "--manifest", str(write_manifest(photos, data / "base.csv")), "--catalog",
                             "base", "--wait", "--json").stdout)
        assert res["ok"] == 24
        yield m
        m["client"].close()
    finally:
        cli(env, "down", check=False)


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def corpus(photo: bytes) -> list[tuple[str, bytes, str, str]]:
    """(name, image bytes, expected status, reason substring or '' for OK)."""
    real = Image.open(io.BytesIO(photo)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [real, real.rotate(90)]
    rng = np.random.default_rng(7)
    return [
        ("truncated jpeg", photo[: len(photo) // 3], "INVALID_ARGUMENT", "truncated"),
        ("zero bytes", b"", "INVALID_ARGUMENT", "no query image"),
        ("random bytes", rng.integers(0, 256, 20000, dtype=np.uint8).tobytes(), "INVALID_ARGUMENT", "not an image"),
        ("pixel bomb", png_claiming(200_000, 200_000), "INVALID_ARGUMENT", "decompression bomb"),
        ("huge dimensions", png_claiming(9000, 9000), "INVALID_ARGUMENT", "over the limit"),
        ("1x1", enc(Image.new("RGB", (1, 1)), "PNG"), "INVALID_ARGUMENT", "smaller than"),
        ("text as .jpg", b"hello, I am a text file\n" * 50, "INVALID_ARGUMENT", "not an image"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "INVALID_ARGUMENT", "not an image"),
        ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n", "INVALID_ARGUMENT", "not accepted"),
        ("oversize message", rng.integers(0, 256, 9 * 1024 * 1024, dtype=np.uint8).tobytes(), "RESOURCE_EXHAUSTED", ""),
        ("cmyk jpeg", enc(real.convert("CMYK"), "JPEG"), "OK", ""),
        ("16-bit png", enc(Image.fromarray(np.asarray(real.convert("L"), np.uint16) * 257), "PNG"), "OK", ""),
        ("palette + alpha png", enc(real.convert("RGBA").convert("P"), "PNG", transparency=0), "OK", ""),
        ("rgba png", enc(real.convert("RGBA"), "PNG"), "OK", ""),
        ("grayscale", enc(real.convert("L"), "JPEG"), "OK", ""),
        ("animated gif", enc(frames[0], "GIF", save_all=True, append_images=frames[1:]), "OK", ""),
        ("exif rotated", enc(real.resize((400, 300)), "JPEG", exif=exif.tobytes()), "OK", ""),
        ("webp", enc(real, "WEBP"), "OK", ""),
        ("progressive jpeg", enc(real, "JPEG", progressive=True, quality=85), "OK", ""),
        ("bmp", enc(real, "BMP"), "OK", ""),
        ("tiff", enc(real, "TIFF"), "OK", ""),
    ]


def status_of(fn):
    try:
        return "OK", fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def test_hostile_search_corpus(rmesh, grocery):
    photo = grocery["val"][0].path.read_bytes()
    client = rmesh["client"]
    cases = corpus(photo)
    assert len(cases) >= 20
    outcomes = {}
    for name, data, expected, reason in cases:
        code, resp = status_of(lambda d=data: client.search(d, catalog="base", top_k=3))
        outcomes[name] = code
        assert code == expected, (name, code, resp)
        if code == "OK":
            assert resp.hits, name
        elif reason:
            assert reason in resp, (name, resp)
    rotated = client.search(cases[16][1], catalog="base", top_k=1, full_frame=True)
    assert (rotated.query_box.x2, rotated.query_box.y2) == (300, 400), "EXIF orientation applied"
    qb = client.search(cases[16][1], catalog="base", top_k=1).query_box  # through the detector
    assert 0 <= qb.x1 < qb.x2 <= 300 and 0 <= qb.y1 < qb.y2 <= 400, qb
    print("hostile corpus:", json.dumps(outcomes))


def test_hostile_requests(rmesh, grocery):
    client, photo = rmesh["client"], grocery["val"][0].path.read_bytes()
    before = {c.name: c.objects for c in client.catalogs()}

    def ingest(*items, catalog="base"):
        return lambda: client.ingest(list(items), catalog=catalog)

    item = gateway_pb2.IngestItem
    cases = [
        ("wrong catalog", lambda: client.search(photo, catalog="nosuch"), "NOT_FOUND", "does not exist"),
        ("bad catalog name", lambda: client.search(photo, catalog="../etc"), "INVALID_ARGUMENT", "catalog name"),
        ("top_k too large", lambda: client.search(photo, catalog="base", top_k=100_000), "INVALID_ARGUMENT", "top_k"),
        ("empty id", ingest(item(item_id="", image=photo)), "INVALID_ARGUMENT", "item id"),
        ("id with #", ingest(item(item_id="a#1", image=photo)), "INVALID_ARGUMENT", "item id"),
        ("duplicate id", ingest(item(item_id="dup", image=photo), item(item_id="dup", image=photo)),
         "INVALID_ARGUMENT", "appears twice"),
        ("no source", ingest(item(item_id="nothing")), "INVALID_ARGUMENT", "neither image bytes nor a uri"),
        ("path without roots", ingest(item(item_id="p", uri="/etc/passwd")), "INVALID_ARGUMENT", "ingest roots"),
        ("unknown job", lambda: client.job("0123456789abcdef"), "NOT_FOUND", "does not exist"),
        ("unknown item", lambda: client.get("nosuchitem", catalog="base"), "NOT_FOUND", "is not in catalog"),
        ("delete nothing", lambda: client.delete([], catalog="base"), "INVALID_ARGUMENT", "no item ids"),
    ]
    for name, fn, expected, reason in cases:
        code, details = status_of(fn)
        assert code == expected and reason in details, (name, code, details)
    assert {c.name: c.objects for c in client.catalogs()} == before, "nothing stored was lost or added"
    st = json.loads(cli(rmesh["env"], "status", "--json").stdout)
    assert all(c["health"] == "SERVING" for c in st["components"])


def index_items(rmesh, catalog: str) -> list[tuple[str, str]]:
    from pymilvus.exceptions import MilvusException

    from visearch.store import milvus_client

    for attempt in range(3):  # a fresh client can meet the server's keepalive policy ("too many pings")
        try:
            client = milvus_client(rmesh["comps"]["milvus"]["address"])
            rows = client.query(f"vs_{catalog}", filter='object_id != ""', output_fields=["item_id", "object_id"],
                                limit=16000)
            client.close()
            return [(r["item_id"], r["object_id"]) for r in rows]
        except MilvusException:
            if attempt == 2:
                raise
            time.sleep(1)
    return []


def diagnosis(rmesh, jobs: Jobs, job_id: str) -> str:
    """One line on where a job's items are when it does not finish: its counts, the queue and the
    broker's unacknowledged messages, every component's state, and the worker's last warnings."""
    from visearch import redisconn

    st = jobs.status(job_id)
    parts = [f"job done {st.done} failed {st.failed} pending {st.pending} of {st.submitted}"]
    try:
        r = redisconn.client(mesh.load_state(rmesh["data"])["settings"]["VISEARCH_REDIS_URL"])
        parts.append(f"queue {r.llen('visearch.ingest')} unacked {r.hlen('unacked')} "
                     f"unacked_index {r.zcard('unacked_index')} keys {sorted(k.decode() for k in r.keys('unacked*'))}")
    except Exception as e:  # noqa: BLE001 - a diagnosis, best effort
        parts.append(f"redis: {e}")
    for c in mesh.status(rmesh["data"]):
        parts.append(f"{c['name']} pid {c['pid']} running {c['running']} healthy {c['healthy']}")
    sup = mesh.supervisor_status(rmesh["data"]) or {}
    parts.append(f"supervisor {sup.get('running')}: "
                 + " / ".join(Path(sup["log"]).read_text(errors="replace").splitlines()[-4:]) if sup.get("log") else "")
    worker_log = next(c["log"] for c in mesh.load_state(rmesh["data"])["components"] if c["name"] == "worker")
    warned = [ln[:300] for ln in Path(worker_log).read_text(errors="replace").splitlines()
              if '"WARNING"' in ln or '"ERROR"' in ln]
    parts.append("worker: " + " / ".join(warned[-3:]))
    return "; ".join(parts)


def ingest_under_fault(rmesh, grocery, tmp_path, catalog: str, fault, n: int = 500, fault_at: int = 100) -> None:
    """Ingest `n` train photos, run `fault` once `fault_at` are stored, and check every item is
    stored exactly once when the job ends."""
    photos = grocery["train"][:n]
    manifest = write_manifest(photos, tmp_path / f"{catalog}.csv")
    job_id = json.loads(cli(rmesh["env"], "ingest", "--manifest", str(manifest), "--catalog", catalog,
                            "--json").stdout)["job_id"]
    jobs = Jobs.from_url(rmesh["comps"]["redis"]["address"], 60)
    wait_until(lambda: jobs.status(job_id).done >= fault_at, 300, "first items stored")
    fault()
    try:
        wait_until(lambda: jobs.status(job_id).finished, 600, "job finished after the fault")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {diagnosis(rmesh, jobs, job_id)}") from None
    st = jobs.status(job_id)
    assert (st.submitted, st.done, st.failed, st.pending) == (n, n, 0, 0), st
    rows = index_items(rmesh, catalog)
    assert {item for item, _ in rows} == {p.path.stem for p in photos}, "every submitted item stored"
    # An item is stored as its objects <item>#0..#k-1 (full frame and detected boxes): each once.
    assert len({obj for _, obj in rows}) == len(rows), "no object stored twice"
    per_item: dict[str, list[str]] = {}
    for item, obj in rows:
        per_item.setdefault(item, []).append(obj)
    for item, objs in per_item.items():
        assert sorted(objs) == sorted(f"{item}#{n}" for n in range(len(objs))), (item, objs)


def test_worker_killed_mid_ingest(rmesh, grocery, tmp_path):
    def kill_worker():
        pid = mesh.load_state(rmesh["data"])["components"][-1]["pid"]
        os.killpg(pid, 9)  # the worker and its pool children, mid-batch
        wait_until(lambda: not mesh.alive(pid), 10, "worker gone")
        mesh.restart(rmesh["data"], "worker")

    ingest_under_fault(rmesh, grocery, tmp_path, "killed", kill_worker, n=240, fault_at=60)


def test_redis_restarted_mid_ingest(rmesh, grocery, tmp_path):
    ingest_under_fault(rmesh, grocery, tmp_path, "redisrestart", lambda: mesh.restart(rmesh["data"], "redis"),
                       n=240, fault_at=60)


def test_embedding_outage_while_searching(rmesh, grocery):
    photo = grocery["val"][1].path.read_bytes()
    client = GatewayClient(rmesh["state"]["gateway"], key=mesh.read_admin_key(rmesh["data"]), timeout=10)
    gateway_pid = rmesh["comps"]["gateway"]["pid"]
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def search_loop():
        while not stop.is_set():
            code, _ = status_of(lambda: client.search(photo, catalog="base", top_k=3))
            results.append((time.monotonic(), code))
            time.sleep(0.05)

    t = threading.Thread(target=search_loop)
    t.start()
    try:
        time.sleep(2)
        emb = next(c for c in mesh.load_state(rmesh["data"])["components"] if c["name"] == "embedding")
        # Held, so the supervisor does not start it again after its 0.5 s backoff: the outage lasts
        # the 3 s the test means, not however long the supervisor's restart happens to take.
        hold = Path(rmesh["data"]) / "run" / "hold-embedding"
        hold.parent.mkdir(exist_ok=True)
        hold.touch()
        try:
            down_at = time.monotonic()
            mesh.stop_pid(emb["pid"], 10)
            time.sleep(3)
            up_at = time.monotonic()
            mesh.restart(rmesh["data"], "embedding")  # the supervisor serves the request, held or not
        finally:
            hold.unlink(missing_ok=True)
        back_at = time.monotonic()
        time.sleep(4)
    finally:
        stop.set()
        t.join()
        client.close()
    codes = {c for _, c in results}
    assert codes <= {"OK", "UNAVAILABLE"}, codes
    assert any(c == "UNAVAILABLE" for ts, c in results if down_at <= ts <= back_at), "the outage was seen"
    assert all(c == "OK" for ts, c in results if ts < down_at), "no error before the outage"
    late = [c for ts, c in results if ts > back_at + 2.0]
    assert late and all(c == "OK" for c in late), "searches recover without restarting the gateway"
    assert all(c == "OK" for ts, c in results if ts < down_at - 0.5) and up_at > down_at
    assert mesh.alive(gateway_pid)


def test_overload_gets_resource_exhausted_and_memory_stays_flat(rmesh, grocery):
    from bench.load import rss_kib, run_load

    gateway_pid = rmesh["comps"]["gateway"]["pid"]
    photo = grocery["val"][2].path.read_bytes()
    key = mesh.read_admin_key(rmesh["data"])
    run_load(rmesh["state"]["gateway"], key, photo, "base", concurrency=16, seconds=3)  # warm up
    before = rss_kib(gateway_pid)
    report = run_load(rmesh["state"]["gateway"], key, photo, "base", concurrency=16, seconds=8)
    after = rss_kib(gateway_pid)
    print("overload:", json.dumps(report), "gateway rss KiB", before, "->", after)
    assert set(report["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, report["codes"]
    assert report["codes"].get("RESOURCE_EXHAUSTED", 0) > 0 and report["codes"].get("OK", 0) > 0
    assert after - before < 50 * 1024, "gateway memory must not grow with the overload"


def test_every_component_killed_comes_back_by_itself(rmesh, grocery, tmp_path):
    """kill -9 each component of the running mesh in turn, during an ingest: the supervisor starts
    each again (same address and data), the services reconnect by themselves, searches answer
    again after each, and the ingest ends with every item stored once. Last in this module: it
    replaces every process of the mesh."""
    from visearch.store import milvus_client

    order = ["redis", "milvus", "detection", "embedding", "rerank", "gateway", "worker"]
    photo = grocery["val"][3].path.read_bytes()
    killed: dict[str, int] = {}

    def current(name: str) -> dict:
        return next(c for c in mesh.load_state(rmesh["data"])["components"] if c["name"] == name)

    def search_ok() -> bool:
        c = GatewayClient(rmesh["state"]["gateway"], key=mesh.read_admin_key(rmesh["data"]), timeout=10)
        try:
            return bool(c.search(photo, catalog="base", top_k=3).hits)
        finally:
            c.close()

    def kill_each():
        for name in order:
            old = current(name)["pid"]
            os.killpg(old, signal.SIGKILL)
            killed[name] = old
            wait_until(lambda n=name, o=old: current(n)["pid"] != o and mesh.check_health(current(n)), 180,
                       f"{name} restarted by the supervisor")
            wait_until(search_ok, 120, f"searches answer after {name} was killed")

    ingest_under_fault(rmesh, grocery, tmp_path, "killall", kill_each)
    st = json.loads(cli(rmesh["env"], "status", "--json").stdout)
    rows = {c["name"]: c for c in st["components"]}
    for name in order:
        assert rows[name]["health"] == "SERVING", rows[name]
        assert rows[name]["restarts"] >= 1 and rows[name]["last_exit"] == -9, rows[name]
        assert rows[name]["pid"] != killed[name] and Path(rows[name]["log"]).is_file()
    assert st["supervisor"]["running"]
    assert search_ok()
    client = milvus_client(rows["milvus"]["address"])
    assert client.list_collections(), "the catalogs survived Milvus's restart"
    client.close()
    rmesh["comps"] = {c["name"]: c for c in mesh.load_state(rmesh["data"])["components"]}
