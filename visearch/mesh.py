"""Bring the whole mesh up as separate local processes, and down again.

`up` starts Redis (unless VISEARCH_REDIS_URL names one), a Milvus Lite server on
a folder of the data dir (unless VISEARCH_MILVUS_URI names a Milvus), the four
gRPC services and one Celery worker, each in its own process group, logging to
`<data-dir>/logs/<name>.log`, and records them in `<data-dir>/mesh.json`. The processes are
started by the mesh's supervisor (`visearch.supervise`), which restarts one that exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from visearch import liteserver
from visearch.meshfiles import STATE, default_data_dir, load_state, read_admin_key  # noqa: F401 - mesh.X for callers

LOCK = "mesh.lock"
LAUNCH_ERROR = "launch.error"
# Popen of every process this process started, by pid: kept so that its exit status is ours to
# read (a dropped Popen is reaped by the subprocess module behind our back).
CHILDREN: dict[int, subprocess.Popen] = {}
SERVICES = ("detection", "embedding", "rerank", "gateway")


class MeshError(RuntimeError):
    pass


@dataclass
class Component:
    name: str
    pid: int
    address: str
    kind: str  # redis | milvus | grpc | worker
    log: str
    argv: list[str] | None = None
    metrics: str = ""  # host:port of its /metrics, when it serves one


_HANDED_OUT: set[int] = set()


def _listen_range() -> range:
    """Ports to listen on: below the kernel's ephemeral range, which it never hands to an outgoing
    connection or to bind(0) (a port found free with bind(0) can be taken by another process's
    connection before the component it was meant for binds it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10_000, low) if low > 12_000 else range(0)


_RNG = random.Random()


def free_port() -> int:
    """A port free now, outside the ephemeral range, and not handed out before by this process
    (every component of `up` gets its port before any of them starts)."""
    ports = _listen_range()
    for _ in range(200):
        with socket.socket() as s:
            if ports:
                port = _RNG.choice(ports)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            else:  # no room below the ephemeral range: whatever the kernel gives
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free port that was not already handed out")


def worker_concurrency(env: dict[str, str]) -> int:
    """Pool children per worker under `env` (VISEARCH_WORKER_CONCURRENCY, else the default)."""
    from visearch.settings import WorkerSettings

    return int(env.get("VISEARCH_WORKER_CONCURRENCY") or WorkerSettings.model_fields["worker_concurrency"].default)


def free_ports(n: int) -> int:
    """The first of n consecutive ports, each free now and not handed out before (a worker's pool
    child i serves its /metrics on the first + i)."""
    top = _listen_range().stop or 65536
    for _ in range(100):
        base = free_port()
        block = range(base + 1, base + n)
        if any(p in _HANDED_OUT or p >= top for p in block):
            continue
        try:
            for p in block:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _HANDED_OUT.update(block)
        return base
    raise OSError(f"no {n} consecutive free ports")


def last_line(log_path: str) -> str:
    """The last meaningful line of a component's log (its error, usually), cut to 300 characters."""
    try:
        lines = Path(log_path).read_text(errors="replace")[-8000:].splitlines()
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith((" ", "Traceback", "During handling"))]
    return lines[-1][:300] if lines else "nothing logged"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def ensure_credentials(data_dir: Path) -> tuple[Path, str]:
    """The mesh's key file (an admin key granted everything) and internal token, made once, owner-only."""
    from visearch.auth import KeyStore, hash_key, new_key

    sec = data_dir / "secrets"
    sec.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys, admin, token_file = sec / "keys.json", sec / "admin.key", sec / "internal.token"
    if not (keys.is_file() and admin.is_file()):
        key = new_key()
        KeyStore.write(keys, [{"id": "admin", "sha256": hash_key(key), "catalogs": ["*"], "actions": ["*"]}])
        _write_secret(admin, key)
    if not token_file.is_file():
        _write_secret(token_file, new_key())
    return keys, token_file.read_text().strip()


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def _spawn(name: str, argv: list[str], env: dict, data_dir: Path) -> tuple[int, str]:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=str(data_dir))
    CHILDREN[proc.pid] = proc
    return proc.pid, str(log_path)


def update_state(data_dir: Path, change) -> dict:
    """Read, change (change(state) in place) and write the mesh record under its lock, atomically:
    the supervisor and `visearch restart` both write it."""
    data_dir = Path(data_dir)
    with open(data_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state(data_dir)
        if state is None:
            raise FileNotFoundError(data_dir / STATE)
        change(state)
        write_state(data_dir, state)
        return state


def write_state(data_dir: Path, state: dict) -> None:
    tmp = Path(data_dir) / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, Path(data_dir) / STATE)


def held(data_dir: Path, name: str) -> bool:
    """Is a component held (being restarted by hand): the supervisor leaves it alone."""
    return (Path(data_dir) / "run" / f"hold-{name}").exists()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def respawn(data_dir: Path, state: dict, comp: dict) -> tuple[int, str]:
    """Start component `comp` again as `up` started it: same argv, settings, address, ports, data."""
    env = component_env(data_dir, comp["name"], state)
    if comp["kind"] == "grpc":
        service = comp["name"].split("-")[0]
        env[f"VISEARCH_{service.upper()}_PORT"] = comp["address"].rsplit(":", 1)[1]
    if comp.get("metrics"):
        var = "VISEARCH_WORKER_METRICS_PORT" if comp["kind"] == "worker" else "VISEARCH_METRICS_PORT"
        env[var] = comp["metrics"].rsplit(":", 1)[1]
    return _spawn(comp["name"], comp["argv"], env, Path(data_dir))


def check_health(c: dict, timeout: float = 1.0) -> bool:
    """Is this component answering? (gRPC health SERVING, Redis PING, Milvus listing, worker ping)."""
    try:
        if c["kind"] == "grpc":
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            from visearch.grpcserver import sync_channel
            from visearch.settings import SecuritySettings

            with sync_channel(c["address"], SecuritySettings()) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                return r.status == health_pb2.HealthCheckResponse.SERVING
        if c["kind"] == "redis":
            from visearch import redisconn

            return bool(redisconn.client(c["address"], socket_timeout=timeout, socket_connect_timeout=timeout).ping())
        if c["kind"] == "milvus":
            from visearch.store import milvus_client

            client = milvus_client(c["address"], timeout=timeout)
            client.list_collections()
            client.close()
            return True
        if c["kind"] == "worker":
            if c.get("pid") and not alive(c["pid"]):
                return False
            from visearch.queue import make_celery
            from visearch.settings import QueueSettings

            app = make_celery(QueueSettings(redis_url=c["address"]))
            replies = app.control.ping(timeout=timeout)
            return any(f"worker{c['pid']}@" in name for r in replies for name in r)
    except Exception:  # noqa: BLE001 - anything failing means "not healthy"
        return False
    return False


def status(data_dir: Path) -> list[dict]:
    state = load_state(data_dir)
    if not state:
        return []
    out = []
    for c in state["components"]:
        running = c["pid"] == 0 or alive(c["pid"])
        out.append({**c, "running": running, "healthy": running and check_health(c)})
    return out


def supervisor_status(data_dir: Path) -> dict | None:
    state = load_state(data_dir)
    sup = (state or {}).get("supervisor") or {}
    if not sup.get("pid"):
        return None
    return {"pid": sup["pid"], "running": alive(sup["pid"]), "log": sup.get("log", "")}


def up(data_dir: Path, ingest_roots: list[str] | None = None, timeout: float = 180.0, log=print,
       replicas: dict[str, int] | None = None, workers: int = 1) -> dict:
    """Start everything, wait until all are healthy, return the state record.

    `replicas` runs several processes of a service (e.g. {"embedding": 2}); `workers` Celery workers.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(data_dir)
    if state and all(c["pid"] == 0 or alive(c["pid"]) for c in state["components"]):
        log(f"mesh already up in {data_dir}")
        return state
    if state:
        down(data_dir, log=lambda *_: None)
    (data_dir / LAUNCH_ERROR).unlink(missing_ok=True)
    # The supervisor starts every component (so it is their parent and knows how each one ends)
    # and keeps them alive; this process waits for their health.
    spec = {"ingest_roots": [str(r) for r in ingest_roots or []], "replicas": replicas or {}, "workers": workers}
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "supervisor.log", "ab") as out:
        sup = subprocess.Popen([sys.executable, "-m", "visearch.supervise", str(data_dir)], stdin=subprocess.PIPE,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(data_dir))
    sup.stdin.write(json.dumps(spec).encode())
    sup.stdin.close()
    deadline = time.monotonic() + timeout
    while True:
        state = load_state(data_dir)
        if state and state.get("supervisor", {}).get("pid") == sup.pid:
            break
        if sup.poll() is not None:
            err = data_dir / LAUNCH_ERROR
            raise MeshError(err.read_text().strip() if err.is_file() else
                            f"the supervisor exited while starting the mesh: {last_line(str(logs / 'supervisor.log'))} "
                            f"(log: {logs / 'supervisor.log'})")
        if time.monotonic() > deadline:
            sup.terminate()
            raise MeshError(f"the mesh was not started within {timeout:.0f}s (log: {logs / 'supervisor.log'})")
        time.sleep(0.1)
    return _wait_healthy(data_dir, state, deadline, log)


def launch(data_dir: Path, ingest_roots: list[str], replicas: dict[str, int], workers: int,
           supervisor: dict | None = None) -> dict:
    """Start every component (in the supervisor's process) and write the mesh record."""
    # Every VISEARCH_* setting passes through to the processes; addresses and ports are the mesh's own.
    env = {k: v for k, v in os.environ.items() if not (k.endswith("_ADDR") or k.endswith("_PORT"))}
    env["PYTHONUNBUFFERED"] = "1"
    # One process per component is the parallelism here: an OpenMP or BLAS pool per process
    # (faiss inside Milvus Lite, numpy) only spins against the others on a small box. Milvus
    # Lite's HNSW search at 10k x 1280 took 70 ms p50 with the default pool, 11 ms with one
    # thread (docs/PERFORMANCE.md). Set them to override.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    keys_file, token = ensure_credentials(data_dir)
    env.setdefault("VISEARCH_API_KEYS_FILE", str(keys_file))
    env.setdefault("VISEARCH_INTERNAL_TOKEN", token)
    env.setdefault("VISEARCH_BLOB_DIR", str(data_dir / "blobs"))
    env.setdefault("VISEARCH_LOCAL_DIR", str(data_dir / "local"))
    # The gateways' audit trail (one JSON line per ingest, delete, re-embed and admin call), beside the logs.
    env.setdefault("VISEARCH_AUDIT_LOG", str(data_dir / "logs" / "audit.log"))
    comps: list[Component] = []
    try:
        if not env.get("VISEARCH_REDIS_URL"):
            exe = shutil.which("redis-server")
            if not exe:
                raise MeshError("redis-server not found: install it (apt-get install redis-server) "
                                "or set VISEARCH_REDIS_URL to a running Redis")
            port = free_port()
            (data_dir / "redis").mkdir(exist_ok=True)
            # A memory cap that refuses writes instead of evicting keys: the queue, the unacked
            # tasks and the job records are never dropped to make room (the gateway refuses image
            # bytes that would fill it, RESOURCE_EXHAUSTED).
            argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir / "redis"),
                    # Every write on disk before Redis answers it: a kill -9 loses no job record or task.
                    "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
                    "--maxmemory", env.get("VISEARCH_REDIS_MAXMEMORY", "1gb"), "--maxmemory-policy", "noeviction"]
            pid, lp = _spawn("redis", argv, env, data_dir)
            env["VISEARCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            comps.append(Component("redis", pid, env["VISEARCH_REDIS_URL"], "redis", lp, argv))
        else:
            comps.append(Component("redis", 0, env["VISEARCH_REDIS_URL"], "redis", ""))
        if not env.get("VISEARCH_MILVUS_URI"):
            port = free_port()
            argv = liteserver.argv(data_dir / "milvus", port)  # Milvus Lite, writes serialised
            pid, lp = _spawn("milvus", argv, env, data_dir)
            env["VISEARCH_MILVUS_URI"] = f"http://127.0.0.1:{port}"
            # Milvus Lite searches in Python on the cores the forwards use, and pays a pass over every
            # row per call: one call for a search's views, after its forwards (docs/VERIFY.md, stop 42).
            env.setdefault("VISEARCH_EARLY_FULL_FRAME_SEARCH", "false")
            comps.append(Component("milvus", pid, env["VISEARCH_MILVUS_URI"], "milvus", lp, argv))
        else:
            comps.append(Component("milvus", 0, env["VISEARCH_MILVUS_URI"], "milvus", ""))

        # Several replicas of a service share one client target, "ipv4:host:p1,host:p2":
        # callers spread calls over them with gRPC's round_robin policy.
        replicas = {name: max(1, (replicas or {}).get(name, 1)) for name in SERVICES}
        ports = {name: [free_port() for _ in range(replicas[name])] for name in SERVICES}
        for name in SERVICES:
            addrs = [f"127.0.0.1:{p}" for p in ports[name]]
            env[f"VISEARCH_{name.upper()}_ADDR"] = addrs[0] if len(addrs) == 1 else "ipv4:" + ",".join(addrs)
        if ingest_roots:
            env["VISEARCH_INGEST_ROOTS"] = ":".join(str(Path(r).resolve()) for r in ingest_roots)
        # Only the gateway takes API keys; the services behind it take the internal token alone.
        internal_env = {k: v for k, v in env.items() if k != "VISEARCH_API_KEYS_FILE"}
        for name in SERVICES:
            for n, port in enumerate(ports[name]):
                argv = [sys.executable, "-m", f"services.{name}"]
                # Each process its own port and /metrics port, recorded in the state.
                metrics = free_port()
                penv = dict(env if name == "gateway" else internal_env, VISEARCH_METRICS_PORT=str(metrics),
                            **{f"VISEARCH_{name.upper()}_PORT": str(port)})
                cname = name if n == 0 else f"{name}-{n + 1}"
                pid, lp = _spawn(cname, argv, penv, data_dir)
                comps.append(Component(cname, pid, f"127.0.0.1:{port}", "grpc", lp, argv, f"127.0.0.1:{metrics}"))
        for n in range(max(1, workers)):
            argv = [sys.executable, "-m", "services.worker"]
            metrics = free_ports(worker_concurrency(env))
            cname = "worker" if n == 0 else f"worker-{n + 1}"
            pid, lp = _spawn(cname, argv, dict(env, VISEARCH_WORKER_METRICS_PORT=str(metrics)), data_dir)
            comps.append(Component(cname, pid, env["VISEARCH_REDIS_URL"], "worker", lp, argv, f"127.0.0.1:{metrics}"))
    finally:
        # The settings the processes got, so one can be restarted alike (the token stays in secrets/).
        settings = {k: v for k, v in env.items() if k.startswith("VISEARCH_") and k != "VISEARCH_INTERNAL_TOKEN"}
        now = time.time()
        state = {"data_dir": str(data_dir), "gateway": env.get("VISEARCH_GATEWAY_ADDR", ""),
                 "components": [dict(asdict(c), restarts=0, last_exit=None, state="running", started=now)
                                for c in comps],
                 "started_at": now, "settings": settings, "supervisor": supervisor or {}}
        write_state(data_dir, state)
    return state


def _wait_healthy(data_dir: Path, state: dict, deadline: float, log) -> dict:
    """Until every component answers; one the supervisor gave up on (it kept exiting) ends the wait."""
    timeout = max(0.0, deadline - time.monotonic())
    pending = {c["name"] for c in state["components"]}
    while pending:
        state = load_state(data_dir) or state
        for c in state["components"]:
            if c["name"] not in pending:
                continue
            if c.get("state") == "failed":
                down(data_dir, log=lambda *_: None)
                raise MeshError(f"{c['name']} exited during start-up: {last_line(c['log'])} (log: {c['log']})")
            if check_health(c):
                log(f"  {c['name']:<10} healthy  {c['address']}")
                pending.discard(c["name"])
        if pending and time.monotonic() > deadline:
            down(data_dir, log=lambda *_: None)
            raise MeshError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))} "
                            f"(logs in {data_dir / 'logs'})")
        if pending:
            time.sleep(0.3)
    return state


def component_env(data_dir: Path, name: str, state: dict | None = None) -> dict[str, str]:
    """The environment `up` gave component `name` (services, worker), secrets included."""
    state = state or load_state(data_dir)
    if not state:
        raise MeshError(f"no mesh is up in {data_dir}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(state["settings"], PYTHONUNBUFFERED="1")
    env["VISEARCH_INTERNAL_TOKEN"] = (Path(data_dir) / "secrets" / "internal.token").read_text().strip()
    if name.split("-")[0] not in ("gateway", "worker"):
        env.pop("VISEARCH_API_KEYS_FILE", None)
    return env


def stop_pid(pid: int, grace: float) -> None:
    """SIGTERM a process group, then SIGKILL it after `grace` s (reaping it when it is a child)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def restart(data_dir: Path, name: str, grace: float = 15.0, wait: float = 120.0) -> dict:
    """Stop one component `up` started (if running) and start it again: same argv, settings, address,
    data. The supervisor leaves it alone meanwhile (a hold file), and supervises the new process after."""
    data_dir = Path(data_dir).resolve()
    state = load_state(data_dir)
    comps = {c["name"]: c for c in (state or {}).get("components", [])}
    comp = comps.get(name)
    if not comp or not comp.get("argv"):
        raise MeshError(f"{name!r} is not a component this mesh started in {data_dir}")
    (data_dir / "run").mkdir(exist_ok=True)
    sup = supervisor_status(data_dir)
    if sup and sup["running"]:
        # The supervisor restarts it (so the new process is its child, supervised like the rest).
        req = data_dir / "run" / f"restart-{name}"
        req.write_text(str(grace))
        deadline = time.monotonic() + grace + wait
        while req.exists():
            if time.monotonic() > deadline or not alive(sup["pid"]):
                req.unlink(missing_ok=True)
                raise MeshError(f"the supervisor did not restart {name} (log: {sup['log']})")
            time.sleep(0.1)
        comp = next(c for c in load_state(data_dir)["components"] if c["name"] == name)
        return _wait_back(comp, name, deadline)
    hold = data_dir / "run" / f"hold-{name}"
    hold.touch()
    try:
        def again(st: dict) -> None:
            c = next(c for c in st["components"] if c["name"] == name)
            if c["pid"] and alive(c["pid"]):
                stop_pid(c["pid"], grace)
            c["pid"], c["log"] = respawn(data_dir, st, c)
            c.update(state="running", started=time.time())
            comp.update(c)

        update_state(data_dir, again)
    finally:
        hold.unlink(missing_ok=True)
    return _wait_back(comp, name, time.monotonic() + wait)


def _wait_back(comp: dict, name: str, deadline: float) -> dict:
    while not check_health(comp):
        if not alive(comp["pid"]) or time.monotonic() > deadline:
            raise MeshError(f"{name} did not come back healthy (log: {comp['log']})")
        time.sleep(0.2)
    return comp


def stop_supervisor(data_dir: Path, state: dict | None, grace: float = 10.0) -> None:
    """Stop the mesh's supervisor (it leaves the components running: each is in a process group of
    its own), so nothing restarts what stops next."""
    pid = ((state or {}).get("supervisor") or {}).get("pid")
    if pid and alive(pid):
        stop_pid(pid, grace)


def down(data_dir: Path, grace: float = 15.0, log=print) -> None:
    """Stop what `up` started: SIGTERM (services drain), then SIGKILL after `grace`."""
    state = load_state(data_dir)
    if not state:
        log("mesh is not up")
        return
    stop_supervisor(data_dir, state)
    state = load_state(data_dir) or state  # the pids it started last
    # Stop in reverse start order: callers before their dependencies.
    comps = [c for c in reversed(state["components"]) if c["pid"]]
    for c in comps:
        if alive(c["pid"]):
            try:
                os.killpg(c["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for c in comps:
        while alive(c["pid"]) and time.monotonic() < deadline:
            try:
                os.waitpid(c["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if alive(c["pid"]):
            try:
                os.killpg(c["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        log(f"  {c['name']:<10} stopped")
    (data_dir / STATE).unlink(missing_ok=True)
