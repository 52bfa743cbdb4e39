"""The Triton backend against a real tritonserver: the same vectors as in-process ONNX Runtime.

The server is the binary shipped in `nvidia-pytriton` (python backend only) on a
repository derived from model_repository/ by visearch.triton_repo (`make triton`
installs it into .venv-triton).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import channel, wait_until
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.errors import FailedPrecondition, Unavailable
from visearch.imaging import decode_image, to_model_input
from visearch.inference import OnnxRuntimeBackend, TritonBackend
from visearch.mesh import free_port
from visearch.triton_repo import derive_cpu_repository, start_server

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-triton"


@pytest.fixture(scope="module")
def triton(tmp_path_factory, model_repo):
    if not VENV.is_dir():
        pytest.fail("the Triton test server is not installed: run `make triton`")
    work = tmp_path_factory.mktemp("triton")
    assert derive_cpu_repository(model_repo, work / "repo") == ["detector", "embedder"]
    http, grpc_port = free_port(), free_port()
    proc = start_server(work / "repo", VENV, work, http, grpc_port, work / "triton.log")
    url = f"127.0.0.1:{grpc_port}"
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    wait_until(lambda: client.is_model_ready("embedder") and client.is_model_ready("detector"), 120, "tritonserver", proc,
               work / "triton.log")
    yield {"url": url, "repo": model_repo, "log": work / "triton.log"}
    proc.terminate()
    proc.wait(20)


def batch_of(paths, size) -> np.ndarray:
    return np.stack([to_model_input(decode_image(p.read_bytes()), size) for p in paths])


def test_derived_config_keeps_the_contract(tmp_path, model_repo):
    derive_cpu_repository(model_repo, tmp_path)
    prod = (model_repo / "embedder" / "config.pbtxt").read_text()
    test = (tmp_path / "embedder" / "config.pbtxt").read_text()
    assert 'backend: "python"' in test and 'backend: "onnxruntime"' in prod
    strip = lambda t: [line for line in t.splitlines() if "backend" not in line and "kind" not in line]  # noqa: E731
    assert strip(prod) == strip(test), "inputs, outputs, batching and versions are copied unchanged"


def test_triton_returns_the_onnxruntime_vectors(triton, grocery):
    photos = [p.path for p in grocery["val"][:6]]

    async def go():
        ort = OnnxRuntimeBackend(triton["repo"])
        tri = TritonBackend(triton["url"], repo=triton["repo"])
        meta_o, meta_t = await ort.metadata("embedder"), await tri.metadata("embedder")
        assert meta_t == meta_o
        x = batch_of(photos, meta_t.input_size)
        a = (await ort.infer("embedder", {"images": x}))["embeddings"]
        b = (await tri.infer("embedder", {"images": x}))["embeddings"]
        # Concurrent single-image requests, which Triton's dynamic batcher may merge.
        singles = await asyncio.gather(*(tri.infer("embedder", {"images": x[i:i + 1]}) for i in range(len(x))))
        await tri.close()
        return a, b, np.concatenate([s["embeddings"] for s in singles])

    a, b, c = asyncio.run(go())
    diff = float(np.abs(a - b).max())
    print(f"max |triton - onnxruntime| = {diff:.2e}, concurrent singles {float(np.abs(a - c).max()):.2e}")
    assert a.shape == b.shape and diff < 1e-5
    assert np.abs(a - c).max() < 1e-4


def test_detector_on_triton_finds_the_same_boxes(triton, grocery):
    from visearch.detector import Detector

    images = [decode_image(p.path.read_bytes()) for p in grocery["val"][::50]]

    async def go():
        ort, tri = OnnxRuntimeBackend(triton["repo"]), TritonBackend(triton["url"], repo=triton["repo"])
        try:
            assert (await tri.metadata("detector")).version == (await ort.metadata("detector")).version
            return (await Detector(ort).detect(images, min_score=0.05),
                    await Detector(tri).detect(images, min_score=0.05))
        finally:
            await tri.close()

    a, b = asyncio.run(go())
    assert sum(map(len, a)) > 0 and [len(x) for x in a] == [len(x) for x in b]
    for xa, xb in zip(a, b, strict=True):
        for ba, bb in zip(xa, xb, strict=True):
            assert ba.label == bb.label and abs(ba.score - bb.score) < 1e-4
            assert np.allclose(ba.xyxy, bb.xyxy, atol=0.05)


def test_triton_version_pin_and_outage_fail_clearly(triton):
    async def go():
        pinned = TritonBackend(triton["url"], repo=triton["repo"], versions={"embedder": "7"})
        with pytest.raises((FailedPrecondition, Unavailable), match="7|version"):
            await pinned.metadata("embedder")
        await pinned.close()

    asyncio.run(go())


def test_embedding_service_on_triton(triton, services, grocery):
    services.env.update(VISEARCH_BACKEND="triton", VISEARCH_TRITON_URL=triton["url"])
    addr_t = services.start("embedding")
    services.env["VISEARCH_BACKEND"] = "onnxruntime"
    port_t = services.env.pop("VISEARCH_EMBEDDING_PORT")
    services.procs["embedding_triton"] = services.procs.pop("embedding")
    addr_o = services.start("embedding")
    assert port_t != services.env["VISEARCH_EMBEDDING_PORT"]
    items = [embedding_pb2.EmbedItem(image=p.path.read_bytes()) for p in grocery["val"][:4]]
    out = {}
    for name, addr in (("triton", addr_t), ("onnxruntime", addr_o)):
        with channel(addr) as ch:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
            resp = stub.Embed(embedding_pb2.EmbedRequest(items=items), timeout=60)
            out[name] = np.array([e.values for e in resp.embeddings])
    assert np.abs(out["triton"] - out["onnxruntime"]).max() < 1e-5
