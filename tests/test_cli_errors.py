"""Operational failures reach a CLI user as one short line and a documented exit status, never a
traceback (unless --debug)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def visearch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visearch.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def short_failure(r: subprocess.CompletedProcess, code: int = 1) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == code, (r.returncode, out[-2000:])
    assert "Traceback" not in out, out[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, r.stderr
    return out


@pytest.fixture()
def photo(grocery):
    return str(grocery["val"][0].path)


def test_search_with_no_mesh_up(tmp_path, photo):
    out = short_failure(visearch("--data-dir", str(tmp_path / "none"), "search", photo))
    assert "no mesh is up" in out and "visearch up" in out


def test_a_local_mesh_is_found_by_its_files(tmp_path, monkeypatch):
    """What the CLI, Client.local and the benches read of a local mesh: the gateway in mesh.json (none
    without one), VISEARCH_API_KEY over the admin key `visearch up` wrote, else no key."""
    import json

    from visearch import meshfiles
    from visearch.client import Client

    monkeypatch.delenv("VISEARCH_API_KEY", raising=False)
    assert meshfiles.gateway_address(tmp_path) is None and meshfiles.api_key(tmp_path) == ""
    (tmp_path / meshfiles.STATE).write_text(json.dumps({"components": []}))  # written before the gateway is up
    assert meshfiles.gateway_address(tmp_path) is None
    with pytest.raises(RuntimeError, match="no mesh is up"):
        Client.local(tmp_path)
    (tmp_path / meshfiles.STATE).write_text(json.dumps({"gateway": "127.0.0.1:1"}))
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin.key").write_text("admin-key\n")
    assert meshfiles.gateway_address(tmp_path) == "127.0.0.1:1" and meshfiles.api_key(tmp_path) == "admin-key"
    monkeypatch.setenv("VISEARCH_API_KEY", "app-key")
    assert meshfiles.api_key(tmp_path) == "app-key"


def test_search_with_a_dead_gateway(photo):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = visearch("--gateway", f"127.0.0.1:{port}", "--timeout", "3", "search", photo)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "UNAVAILABLE" in r.stdout + r.stderr


def test_up_where_the_data_dir_cannot_be_made(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    out = short_failure(visearch("--data-dir", str(blocked / "mesh"), "up", "--timeout", "5"))
    assert str(blocked) in out


def test_debug_shows_the_traceback(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    r = visearch("--debug", "--data-dir", str(blocked / "mesh"), "up", "--timeout", "5")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_an_unexpected_error_is_an_internal_error_with_its_own_status():
    from click.testing import CliRunner

    from visearch import cli

    @cli.main.command("explode-for-test", hidden=True)
    def explode():
        raise ZeroDivisionError("boom")

    try:
        r = CliRunner().invoke(cli.main, ["explode-for-test"])
        assert r.exit_code == cli.EXIT_INTERNAL, r.output
        assert "internal error" in r.output and "--debug" in r.output and "Traceback" not in r.output
    finally:
        cli.main.commands.pop("explode-for-test", None)
