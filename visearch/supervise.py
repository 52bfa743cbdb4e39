"""The local mesh's supervisor: `visearch up` starts it, it starts every component and keeps them alive.

    python -m visearch.supervise DATA_DIR      (the launch spec on stdin, as `visearch.mesh.up` writes it)

It is the parent of every component it starts, so it knows how each one ended. A component that
exits (a crash, kill -9, or any exit `visearch down` did not ask for) is started again with the same
argv, settings, address and data after a backoff (0.5 s, doubling, at most 30 s; reset once it has run
for a minute). One that has been restarted 5 times within 2 minutes is marked `failed` and left down,
with its last exit code and log reported by `visearch status`. Everything it decides goes to the mesh
record (`mesh.json`: per component `restarts`, `last_exit`, `state`) under the record's lock, and to
`logs/supervisor.log`. `visearch restart NAME` asks it (a request file under `run/`): it stops the
component and starts it again as its own child, not counted as a crash; without a supervisor
running, `restart` holds the component (a hold file) and restarts it itself. `visearch down` stops
the supervisor first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from visearch import mesh

log = logging.getLogger("visearch.supervise")

MAX_RESTARTS = 5  # within WINDOW seconds: then the component is failed, not restarted again
WINDOW = 120.0
STABLE = 60.0  # a component up this long starts its backoff again from the first step
BACKOFF_MAX = 30.0


def backoff_base() -> float:
    return float(os.environ.get("VISEARCH_RESTART_BACKOFF_SECONDS", "0.5"))


_DYING: dict[int, float] = {}  # pid -> when it was first seen gone but not yet reapable


def exit_code(pid: int, now: float) -> tuple[bool, int | None]:
    """(ended, how): how a child of ours ended (negative: the signal that killed it; None: not our
    child, so unknown). A killed multi-threaded process shows as a zombie before its last thread
    has exited and it can be reaped: not ended yet, for up to 5 s."""
    proc = mesh.CHILDREN.get(pid)
    if proc is None:
        return True, None
    code = proc.poll()
    if code is None and now - _DYING.setdefault(pid, now) < 5.0:
        return False, None
    _DYING.pop(pid, None)
    mesh.CHILDREN.pop(pid, None)
    return True, code


def tick(data_dir: Path, now: float | None = None) -> list[str]:
    """One round: notice exits, restart what is due, mark what keeps dying. Returns what it did."""
    now = time.time() if now is None else now
    done: list[str] = []

    def update(state: dict) -> None:
        for c in state.get("components", []):
            name = c["name"]
            if not c.get("pid") or not c.get("argv") or mesh.held(data_dir, name):
                continue
            if c.get("state") == "failed":
                continue
            if c.get("state") == "restarting":
                if now >= c.get("next_try", 0):
                    old = c["pid"]
                    mesh.kill_group(old)  # anything its process group left behind (pool children)
                    c["pid"], c["log"] = mesh.respawn(data_dir, state, c)
                    c["restarts"] = c.get("restarts", 0) + 1
                    c["restart_times"] = [t for t in c.get("restart_times", []) if now - t < WINDOW] + [now]
                    c["state"], c["started"] = "running", now
                    done.append(f"{name}: restarted (pid {c['pid']}, restart {c['restarts']})")
                continue
            if mesh.alive(c["pid"]):
                continue
            ended, code = exit_code(c["pid"], time.time())
            if not ended:
                continue
            c["last_exit"] = code
            recent = [t for t in c.get("restart_times", []) if now - t < WINDOW]
            if now - c.get("started", 0) >= STABLE:
                recent = []  # it ran long enough: this is a new failure, not the same one again
            if len(recent) >= MAX_RESTARTS:
                c["state"] = "failed"
                done.append(f"{name}: exited ({describe(code)}) after {len(recent)} restarts within "
                            f"{WINDOW:.0f}s: left down (log: {c.get('log')})")
                continue
            delay = min(BACKOFF_MAX, backoff_base() * (2 ** len(recent)))
            c["state"], c["next_try"], c["restart_times"] = "restarting", now + delay, recent
            done.append(f"{name}: exited ({describe(code)}), restarting in {delay:.1f}s (log: {c.get('log')})")

    mesh.update_state(data_dir, update)
    return done


def serve_requests(data_dir: Path) -> list[str]:
    """`visearch restart NAME` while we run: it leaves a request file, we stop the component
    (SIGTERM, then SIGKILL after its grace) and start it again as our child, then remove the file."""
    done = []
    for req in sorted((data_dir / "run").glob("restart-*")):
        name = req.name[len("restart-"):]
        try:
            grace = float(req.read_text() or 15)
        except (OSError, ValueError):
            grace = 15.0
        state = mesh.load_state(data_dir) or {}
        comp = next((c for c in state.get("components", []) if c["name"] == name and c.get("argv")), None)
        if comp is not None:
            if comp["pid"] and mesh.alive(comp["pid"]):
                mesh.stop_pid(comp["pid"], grace)
            proc = mesh.CHILDREN.pop(comp["pid"], None)
            if proc is not None:  # reap it (a stopped process is not a crash: no exit recorded)
                try:
                    proc.wait(timeout=5)
                except Exception:  # noqa: BLE001 - reaped already, or gone
                    pass

            def again(st: dict, name=name) -> None:
                c = next(c for c in st["components"] if c["name"] == name)
                c["pid"], c["log"] = mesh.respawn(data_dir, st, c)
                c.update(state="running", started=time.time())

            mesh.update_state(data_dir, again)
            done.append(f"{name}: restarted on request")
        req.unlink(missing_ok=True)
    return done


def describe(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    data_dir = Path(args[0]).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    spec = json.loads(sys.stdin.read() or "{}")
    error_file = data_dir / mesh.LAUNCH_ERROR
    try:
        mesh.launch(data_dir, spec.get("ingest_roots") or [], spec.get("replicas") or {}, int(spec.get("workers", 1)),
                    supervisor={"pid": os.getpid(), "log": str(data_dir / "logs" / "supervisor.log")})
    except Exception as exc:  # noqa: BLE001 - told to `up`, which tells the person
        error_file.write_text(f"{type(exc).__name__}: {exc}" if not isinstance(exc, mesh.MeshError) else str(exc))
        log.error("launch failed: %s", exc)
        raise SystemExit(1) from None
    log.info("supervising the mesh in %s", data_dir)
    while not stopping:
        try:
            for line in serve_requests(data_dir) + tick(data_dir):
                (log.error if "left down" in line else log.warning)(line)
        except FileNotFoundError:  # the record is gone: `down` ran without us
            break
        except Exception:  # noqa: BLE001 - one bad round must not end the supervision
            log.exception("supervision round failed")
        time.sleep(0.5)
    log.info("supervisor stopped")


if __name__ == "__main__":
    main()
