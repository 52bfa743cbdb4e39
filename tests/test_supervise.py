"""The mesh's supervisor on real processes: restarts with backoff, exit codes, and a component that
keeps dying reported and left down (the whole mesh under kill -9: tests/test_reliability.py)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from visearch import mesh, supervise

pytestmark = pytest.mark.integration


@pytest.fixture()
def record(tmp_path, monkeypatch):
    """A mesh record of two real processes started by this process: one that exits with status 3
    at once, one that exits with 4 the first time and then stays up."""
    monkeypatch.setenv("VISEARCH_RESTART_BACKOFF_SECONDS", "0.2")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "internal.token").write_text("t\n")
    marker = tmp_path / "second-run"
    comps = []
    for name, code in (("crashy", "raise SystemExit(3)"),
                       ("flaky", f"import os, sys, time\nif not os.path.exists({str(marker)!r}):\n"
                                 f"    open({str(marker)!r}, 'w').close(); sys.exit(4)\ntime.sleep(600)")):
        argv = [sys.executable, "-c", code]
        pid, log = mesh._spawn(name, argv, dict(os.environ), tmp_path)
        comps.append({"name": name, "pid": pid, "address": "", "kind": "worker", "log": log, "argv": argv,
                      "restarts": 0, "last_exit": None, "state": "running", "started": time.time()})
    mesh.write_state(tmp_path, {"components": comps, "settings": {}, "supervisor": {}})
    yield tmp_path
    for c in mesh.load_state(tmp_path)["components"]:
        mesh.kill_group(c["pid"])


def comp(data_dir, name: str) -> dict:
    return next(c for c in mesh.load_state(data_dir)["components"] if c["name"] == name)


def test_restarts_with_backoff_until_a_component_keeps_dying(record):
    said: list[str] = []
    deadline = time.monotonic() + 60
    while comp(record, "crashy")["state"] != "failed" and time.monotonic() < deadline:
        said += supervise.tick(record)
        time.sleep(0.05)
    crashy = comp(record, "crashy")
    assert crashy["state"] == "failed", crashy
    assert crashy["restarts"] == supervise.MAX_RESTARTS and crashy["last_exit"] == 3
    assert any("crashy: exited (exit status 3)" in s and "left down" in s for s in said), said
    # The backoff doubled between restarts: restart n+1 came at least 0.2 x 2^n s after restart n.
    times = crashy["restart_times"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == supervise.MAX_RESTARTS - 1
    assert all(gap >= 0.2 * 2 ** (n + 1) - 0.01 for n, gap in enumerate(gaps)), gaps
    # Left down: more rounds start nothing.
    pid = crashy["pid"]
    for _ in range(5):
        supervise.tick(record)
    assert comp(record, "crashy")["pid"] == pid
    flaky = comp(record, "flaky")
    assert flaky["restarts"] == 1 and flaky["last_exit"] == 4 and flaky["state"] == "running"
    assert mesh.alive(flaky["pid"])


def test_a_held_component_is_left_to_whoever_holds_it(record):
    hold = record / "run" / "hold-crashy"
    hold.parent.mkdir()
    hold.touch()
    time.sleep(0.5)
    for _ in range(5):
        supervise.tick(record)
    assert comp(record, "crashy")["restarts"] == 0
    hold.unlink()
    deadline = time.monotonic() + 10
    while comp(record, "crashy")["restarts"] == 0 and time.monotonic() < deadline:
        supervise.tick(record)
        time.sleep(0.05)
    assert comp(record, "crashy")["restarts"] == 1
    assert json.loads((record / mesh.STATE).read_text())["components"][0]["last_exit"] == 3


def test_a_restart_asked_for_is_done_by_the_supervisor(record):
    """`visearch restart` while the supervisor runs: a request it serves, so the new process is its
    child (its exit is known later), and a requested restart is not counted as a crash."""
    flaky = comp(record, "flaky")
    while comp(record, "flaky")["restarts"] == 0:  # its first run exits with 4: restarted once
        supervise.tick(record)
        time.sleep(0.05)
    before = comp(record, "flaky")
    req = record / "run" / "restart-flaky"
    req.parent.mkdir(exist_ok=True)
    req.write_text("2")
    assert supervise.serve_requests(record) == ["flaky: restarted on request"]
    after = comp(record, "flaky")
    assert not req.exists() and after["pid"] not in (flaky["pid"], before["pid"]) and mesh.alive(after["pid"])
    assert after["restarts"] == before["restarts"] and after["pid"] in mesh.CHILDREN
