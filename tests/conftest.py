"""Real components for the tests: Redis, Milvus Lite and the services as processes on localhost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from visearch import liteserver
from visearch.datasets import grocery_root, grocery_split
from visearch.mesh import free_port
from visearch.settings import DEFAULT_MODEL_REPOSITORY

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.f = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self.f, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                  start_new_session=True)

    def stop(self, sig_timeout: float = 15.0) -> int:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.f.close()
        return self.p.returncode


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if not exe:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = Proc([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(d)], d / "log")
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis.Redis.from_url(url).ping(), 10, "redis", proc.p, proc.log)
    yield url
    proc.stop()


def process_env(pid: int) -> dict[str, str]:
    """A running process's environment, as it was started (Linux /proc)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def start_milvus_lite(data: Path, port: int, log: Path) -> Proc:
    """Milvus Lite as the mesh runs it (visearch.liteserver) on `data`, answering at 127.0.0.1:`port`."""
    from visearch.store import milvus_client

    proc = Proc(liteserver.argv(data, port), log)
    wait_until(lambda: milvus_client(f"http://127.0.0.1:{port}", timeout=1).list_collections() is not None, 30,
               "milvus lite", proc.p, proc.log)
    return proc


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    port = free_port()
    d = tmp_path_factory.mktemp("milvus")
    proc = start_milvus_lite(d / "data", port, d / "log")
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory):
    """A real Milvus 2.3.5 standalone (`milvus-server` from the milvus wheel, `make milvus-server`)."""
    exe = ROOT / ".venv-milvus" / "bin" / "milvus-server"
    if not exe.is_file():
        pytest.fail("the Milvus server is not installed: run `make milvus-server`")
    port = free_port()
    d = tmp_path_factory.mktemp("milvus-server")
    proc = Proc([str(exe), "--data", str(d / "data"), "--proxy-port", str(port)], d / "log")
    from visearch.store import milvus_client

    uri = f"http://127.0.0.1:{port}"
    wait_until(lambda: milvus_client(uri, timeout=2).list_collections() is not None, 180, "milvus-server",
               proc.p, proc.log)
    yield uri
    # SIGINT: SIGTERM would orphan its embedded etcd.
    proc.p.send_signal(signal.SIGINT)
    try:
        proc.p.wait(60)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def model_repo() -> Path:
    """The model repository (VISEARCH_MODEL_REPOSITORY, else the project's) with the embedder and detector built."""
    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    for name in ("embedder", "detector"):
        if not list(repo.glob(f"{name}/[0-9]*/model.onnx")):
            pytest.fail(f"{repo}/{name} is not built: run `make models` (visearch models build)")
    return repo


@pytest.fixture(scope="session")
def grocery():
    root = grocery_root()
    if root is None:
        pytest.skip("the Grocery Store dataset is not at ../shared/data/grocery-store")
    return {"root": root, "train": grocery_split(root, "train"), "val": grocery_split(root, "val")}


def health_serving(address: str, service: str = "") -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING


INTERNAL_TOKEN = "test-internal-token"


def channel(address: str, key: str = INTERNAL_TOKEN) -> grpc.Channel:
    """A channel to a test service that sends `key` on every call."""
    from visearch.grpcserver import sync_channel
    from visearch.settings import SecuritySettings

    return sync_channel(address, SecuritySettings(), key=key)


class ServiceProcs:
    """Starts `python -m services.<name>` processes sharing one environment."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env, self.procs = tmp, env, {}

    def start(self, name: str, wait: bool = True) -> str:
        port = free_port()
        self.env[f"VISEARCH_{name.upper()}_PORT"] = str(port)
        addr = f"127.0.0.1:{port}"
        self.env[f"VISEARCH_{name.upper()}_ADDR"] = addr
        proc = Proc([sys.executable, "-m", f"services.{name}"], self.tmp / f"{name}.log", dict(self.env))
        self.procs[name] = proc
        if wait:
            wait_until(lambda: health_serving(addr), 60, name, proc.p, proc.log)
        return addr

    def stop_all(self):
        for p in reversed(self.procs.values()):
            p.stop()


@pytest.fixture
def services(tmp_path, model_repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_MODEL_REPOSITORY=str(model_repo), VISEARCH_HEALTH_INTERVAL_SECONDS="0.5",
               VISEARCH_GRACE_SECONDS="3", PYTHONUNBUFFERED="1", VISEARCH_INTERNAL_TOKEN=INTERNAL_TOKEN)
    s = ServiceProcs(tmp_path, env)
    yield s
    s.stop_all()


# Tiers (docs/ARCHITECTURE.md, "Tests"): every test is `unit`, `integration` or `mesh`, the package's
# layers mirrored. A module marks `mesh` itself (it brings the whole mesh up); a test that uses a real
# server fixture (Redis, Milvus, service processes) or a module that marks `integration` (it starts
# processes or trains a model) is `integration`; the rest are `unit`: in-process, on real code and
# real models, `make test-unit` in under two minutes.
SERVER_FIXTURES = {"redis_url", "milvus_uri", "milvus_server_uri", "services"}
TIERS = ("unit", "integration", "mesh")


def pytest_collection_modifyitems(config, items):
    for item in items:
        own = [t for t in TIERS if item.get_closest_marker(t)]
        if len(own) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(own)}: one tier a test")
        if not own:
            slow = item.get_closest_marker("train") or SERVER_FIXTURES & set(item.fixturenames)
            tier = "integration" if slow else "unit"
            item.add_marker(getattr(pytest.mark, tier))
