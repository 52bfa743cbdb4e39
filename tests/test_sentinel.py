"""The queue and the job store behind Redis Sentinel: a real primary, a replica and three sentinels
(redis-server in sentinel mode), a whole mesh pointed at them by VISEARCH_REDIS_URL
(`redis+sentinel://...`), and the primary killed in the middle of a 500-item ingest."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import wait_until
from tests.test_mesh import cli
from tests.test_reliability import ingest_under_fault
from visearch import mesh, redisconn
from visearch.client import GatewayClient

pytestmark = pytest.mark.mesh
MASTER = "vsm"


def start(argv: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server not found (apt-get install redis-server)")
    root = tmp_path_factory.mktemp("sentinel")
    base = mesh.free_ports(6)
    primary, replica, sports = base, base + 1, [base + 2, base + 3, base + 4]
    log = open(root / "redis.log", "ab")
    durable = ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--bind", "127.0.0.1"]
    procs = {}
    for name, port, extra in (("primary", primary, []), ("replica", replica, ["--replicaof", "127.0.0.1", str(primary)])):
        (root / name).mkdir()
        procs[name] = start([exe, "--port", str(port), "--dir", str(root / name), *durable, *extra], log)
    for n, port in enumerate(sports):
        conf = root / f"sentinel{n}.conf"  # sentinels rewrite their own config: one writable file each
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 5000\n"
                        f"sentinel parallel-syncs {MASTER} 1\n")
        procs[f"sentinel{n}"] = start([exe, str(conf), "--sentinel"], log)
    url = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in sports)}/{MASTER}/0"
    import redis

    def ready() -> bool:
        try:
            s = redis.Redis(port=sports[0], socket_timeout=1)
            return bool(s.sentinel_slaves(MASTER)) and len(s.sentinel_sentinels(MASTER)) == 2
        except redis.RedisError:
            return False

    wait_until(ready, 30, "the sentinels to know the primary, its replica and each other")
    yield {"url": url, "procs": procs, "primary": primary, "replica": replica, "sentinels": sports}
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    log.close()


@pytest.fixture(scope="module")
def smesh(tmp_path_factory, model_repo, sentinels):
    data = tmp_path_factory.mktemp("smesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_REDIS_URL=sentinels["url"], VISEARCH_VISIBILITY_TIMEOUT="10",
               VISEARCH_HEALTH_INTERVAL_SECONDS="0.5", VISEARCH_INGEST_OBJECTS="full")
    cli(env, "up")
    state = mesh.load_state(data)
    m = {"env": env, "data": data, "state": state, "comps": {c["name"]: c for c in state["components"]}}
    m["client"] = GatewayClient(state["gateway"], key=mesh.read_admin_key(data), timeout=60)
    yield m
    m["client"].close()
    cli(env, "down", check=False)


def test_urls_name_a_single_server_or_sentinels():
    t = redisconn.parse_sentinel("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/prod/2")
    assert t.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380)) and (t.master, t.db, t.password) == ("prod", 2, "s3cret")
    broker, backend, opts = redisconn.celery_urls("redis+sentinel://h1:1,h2:2/prod")
    assert broker == backend == "sentinel://h1:1/0;sentinel://h2:2/0" and opts == {"master_name": "prod"}
    assert redisconn.celery_urls("redis://r:6379/0") == ("redis://r:6379/0", "redis://r:6379/0", {})
    assert redisconn.parse_sentinel("redis://r:6379/0") is None
    for bad in ("redis+sentinel://h1:1", "redis+sentinel://h1/prod", "redis+sentinel://h1:1/prod/x"):
        with pytest.raises(ValueError):
            redisconn.parse_sentinel(bad)


def test_a_password_kept_apart_goes_into_the_url(monkeypatch):
    """VISEARCH_REDIS_PASSWORD (a Kubernetes Secret beside the ConfigMap's URL, deploy/k8s) becomes the URL's
    password, percent-encoded, for a single server and for Sentinel; Celery gets it encoded too."""
    import redis
    from kombu.utils.url import url_to_parts

    from visearch.settings import QueueSettings, WorkerSettings

    monkeypatch.setenv("VISEARCH_REDIS_URL", "redis+sentinel://s1:26379,s2:26379/vs/1")
    monkeypatch.setenv("VISEARCH_REDIS_PASSWORD", "p@ss:w/rd%")
    s = WorkerSettings(milvus_uri="x", detection_addr="d", embedding_addr="e")
    assert s.redis_url == "redis+sentinel://:p%40ss%3Aw%2Frd%25@s1:26379,s2:26379/vs/1"
    assert redisconn.parse_sentinel(s.redis_url).password == "p@ss:w/rd%"
    broker, _, _ = redisconn.celery_urls(s.redis_url)
    assert {url_to_parts(u).password for u in broker.split(";")} == {"p@ss:w/rd%"}
    monkeypatch.delenv("VISEARCH_REDIS_PASSWORD")
    single = QueueSettings(redis_url="redis://r:6379/0", redis_password="k y")
    assert single.redis_url == "redis://:k%20y@r:6379/0"
    assert redis.connection.parse_url(single.redis_url)["password"] == "k y"
    assert QueueSettings(redis_url="redis://user@r/0", redis_password="x").redis_url == "redis://user:x@r/0"
    assert QueueSettings(redis_url="redis://:x@r/0", redis_password="x").redis_url == "redis://:x@r/0"
    assert QueueSettings(redis_url="redis://r/0").redis_url == "redis://r/0"  # no password: as it was
    with pytest.raises(ValueError, match="password of its own"):
        QueueSettings(redis_url="redis://:other@r/0", redis_password="x")
    with pytest.raises(ValueError, match="can only be added"):
        QueueSettings(redis_url="unix:///run/redis.sock", redis_password="x")


def test_primary_killed_mid_ingest_fails_over(smesh, sentinels, grocery, tmp_path):
    """kill -9 of the primary once 100 of 500 items are stored: the sentinels promote the replica, and
    the job ends with every item stored once; searches answer; nothing was restarted by hand."""
    before = {c["name"]: c["pid"] for c in mesh.load_state(smesh["data"])["components"]}

    def kill_primary():
        p = sentinels["procs"]["primary"]
        os.killpg(p.pid, 9)
        p.wait()

    ingest_under_fault(smesh, grocery, tmp_path, "ha", kill_primary, n=500, fault_at=100)
    r = redisconn.client(sentinels["url"])
    assert r.connection_pool.get_master_address() == ("127.0.0.1", sentinels["replica"]), "the replica was promoted"
    photo = grocery["train"][7]
    deadline = time.monotonic() + 60
    while True:
        try:
            hits = smesh["client"].search(photo.path.read_bytes(), catalog="ha", top_k=3).hits
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert hits[0].item_id == photo.path.stem
    after = {c["name"]: c["pid"] for c in mesh.load_state(smesh["data"])["components"]}
    assert after == before, "no component of the mesh was restarted"
