"""`pip install visearch` with no extras is the SDK and the CLI client: in a fresh venv it installs none
of the server side (ONNX Runtime, Milvus, Celery, OpenCV, torch), and the README's SDK example and the
CLI's client commands run from it against a mesh (brought up by the project's own install)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_mesh import cli
from tests.test_sdk import readme_example

pytestmark = pytest.mark.mesh
ROOT = Path(__file__).resolve().parents[1]
# Distributions the SDK-only install must not bring (pip's normalised names).
SERVER_SIDE = {"onnxruntime", "onnxruntime-gpu", "pymilvus", "milvus-lite", "celery", "opencv-python",
               "opencv-python-headless", "torch"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VISEARCH_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the checkout installed as `pip install .` does."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    tmp = tmp_path_factory.mktemp("packaging")
    # The checkout's files as a source tree (what git tracks or would, not .venv, runs/ or built models):
    # building in a copy leaves the checkout's egg-info and build/ alone.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=300)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)], env=clean_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def test_the_sdk_install_has_no_server_side(client_venv, tmp_path):
    py = str(client_venv / "bin" / "python")
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], env=clean_env(), capture_output=True,
                            text=True, check=True).stdout
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listed)}
    assert "visearch" in installed
    assert not SERVER_SIDE & installed, sorted(SERVER_SIDE & installed)
    # The SDK and the CLI import from it (not from the checkout: the cwd is elsewhere).
    code = "import visearch.client, visearch.sdk; print(visearch.client.__file__)"
    r = subprocess.run([py, "-c", code], env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and str(client_venv) in r.stdout, r.stderr
    exe = str(client_venv / "bin" / "visearch")
    r = subprocess.run([exe, "--help"], env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "search" in r.stdout, r.stderr
    # A command of the server side says which extra it needs, and starts nothing.
    r = subprocess.run([exe, "--data-dir", str(tmp_path / "mesh"), "up"], env=clean_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "visearch[server]" in r.stderr, r.stderr
    assert not (tmp_path / "mesh").exists()


@pytest.fixture(scope="module")
def packaging_mesh(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("packaging-mesh")
    env = clean_env(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
                    VISEARCH_INGEST_MAX_OBJECTS="1")
    cli(env, "up")
    yield env, data
    cli(env, "down", check=False)


def test_readme_example_and_the_cli_client_run_from_the_sdk_install(client_venv, packaging_mesh, tmp_path):
    from visearch.datasets import grocery_root

    env, data = packaging_mesh
    run_env = clean_env(VISEARCH_DATA_DIR=str(data), VISEARCH_GROCERY_DIR=str(grocery_root()))
    r = subprocess.run([str(client_venv / "bin" / "python"), "-c", readme_example()], env=run_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hits = eval(r.stdout.strip().splitlines()[-1])  # the example prints [(item_id, score), ...]
    assert hits[0][0] == "Bravo-Orange-Juice_001" and hits[0][1] > 0.95, hits
    r = subprocess.run([str(client_venv / "bin" / "visearch"), "catalogs"], env=run_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {c["name"]: c for c in map(json.loads, r.stdout.splitlines())}
    assert rows["sdk"]["objects"] >= 4, rows
