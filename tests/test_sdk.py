"""The Python SDK against a running local mesh: the README's example as written, the async client,
failover over several addresses, deadlines and final errors."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.test_mesh import cli

pytestmark = pytest.mark.mesh
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdk_mesh(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("sdk-mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo), VISEARCH_INGEST_MAX_OBJECTS="1")
    cli(env, "up")
    yield env, data
    cli(env, "down", check=False)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- sdk-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no sdk-example block"
    return m.group(1)


def test_readme_example_ingests_and_finds_the_photo_itself(sdk_mesh):
    env, _ = sdk_mesh
    code = readme_example()
    assert len(code.strip().splitlines()) <= 6, "the README promises a short example"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    hits = eval(r.stdout.strip().splitlines()[-1])  # the example prints [(item_id, score), ...]
    assert hits[0][0] == "Bravo-Orange-Juice_001" and hits[0][1] > 0.95, hits  # itself (re-ranked by alpha-QE)
    assert {h[0] for h in hits} == {f"Bravo-Orange-Juice_00{i}" for i in range(1, 5)}, hits


def test_async_client_and_failover_over_a_dead_address(sdk_mesh, grocery):
    from visearch import mesh
    from visearch.client import AsyncClient, Client

    env, data = sdk_mesh
    gateway = mesh.load_state(data)["gateway"]
    key = mesh.read_admin_key(data)
    photos = [p for p in grocery["train"] if p.is_product][:3]
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def run():
        async with AsyncClient([dead, gateway], api_key=key, timeout=30) as vs:
            job = await vs.ingest_paths({f"a{i}": p.path for i, p in enumerate(photos)}, catalog="sdk_async")
            done = await vs.wait(job.job_id, timeout=120)
            found = await vs.search(photos[1].path, catalog="sdk_async", top_k=3, rerank="none")
            return done, found, [c.name for c in await vs.catalogs()]

    done, found, names = asyncio.run(run())
    assert (done.done, done.failed) == (3, 0), done
    assert found.hits[0].item_id == "a1" and found.hits[0].score > 0.99
    assert "sdk_async" in names

    with Client(f"{dead},{gateway}", api_key=key, timeout=30) as vs:
        # Every call succeeds although every other one starts at the dead address.
        assert all(vs.get("a0", catalog="sdk_async").item_id == "a0" for _ in range(4))
        # Final errors are raised at once with the gateway's reason, not retried.
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            vs.search(photos[0].path, catalog="no_such_catalog")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no_such_catalog" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            vs.search(b"not an image", catalog="sdk_async")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert time.monotonic() - t0 < 10
        # A deadline is a deadline, retries included: the call ends by it, with the last error.
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            vs.search(photos[0].path, catalog="sdk_async", timeout=0.05)
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - t0 < 1
    with Client(gateway, api_key=key, timeout=30) as vs, pytest.raises(grpc.RpcError) as err:
        vs.search(photos[0].path, catalog="sdk_async", timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    with Client(dead, api_key=key, timeout=2, retries=3, backoff=0.1) as vs:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            vs.catalogs()
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - t0 < 5, "the deadline bounds the retries"
    with Client(gateway, api_key="wrong-key", timeout=10) as vs, pytest.raises(grpc.RpcError) as err:
        vs.catalogs()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
