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

pytestmark = pytest.mark.integration

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


def test_derived_gpu_config_runs_on_the_gpu_with_tensorrt(tmp_path, model_repo):
    """`python -m visearch.triton_repo --gpu`: each model one KIND_GPU instance on GPU 0, ONNX Runtime's
    TensorRT accelerator in FP16 with an engine cache and a shape profile covering every batch the dynamic
    batcher makes; name, backend, inputs, outputs, batching and versions as committed. Parsed here: no GPU
    runs it (docs/SCALE.md)."""
    from visearch.pbtxt import parse_pbtxt
    from visearch.triton_repo import derive_gpu_repository, gpu_config

    assert derive_gpu_repository(model_repo, tmp_path, cache_dir="/cache") == ["detector", "embedder"]
    for name in ("detector", "embedder"):
        src = parse_pbtxt((model_repo / name / "config.pbtxt").read_text())
        gpu = parse_pbtxt((tmp_path / name / "config.pbtxt").read_text())
        assert gpu["backend"] == ["onnxruntime"] and "dynamic_batching" in gpu
        assert gpu["instance_group"] == [{"count": [1], "kind": ["KIND_GPU"], "gpus": [0]}]
        [accel] = gpu["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"]
        params = {p["key"][0]: p["value"][0] for p in accel["parameters"]}
        assert accel["name"] == ["tensorrt"] and params["precision_mode"] == "FP16"
        assert params["trt_engine_cache_enable"] == "1" and params["trt_engine_cache_path"] == f"/cache/{name}"
        [image] = src["input"]
        dims = "x".join(map(str, image["dims"]))
        batches = src["dynamic_batching"][0]["preferred_batch_size"]
        assert params["trt_profile_min_shapes"] == f"{image['name'][0]}:1x{dims}"
        assert params["trt_profile_opt_shapes"] == f"{image['name'][0]}:{max(batches)}x{dims}"
        assert params["trt_profile_max_shapes"] == f"{image['name'][0]}:{src['max_batch_size'][0]}x{dims}"
        rest = lambda conf: {k: v for k, v in conf.items() if k not in ("instance_group", "optimization")}  # noqa: E731
        assert rest(gpu) == rest(src)
        for version in (model_repo / name).glob("[0-9]*"):
            if (version / "model.onnx").is_file():
                assert (tmp_path / name / version.name / "model.onnx").resolve() == (version / "model.onnx").resolve()
    two = parse_pbtxt(gpu_config((model_repo / "embedder" / "config.pbtxt").read_text(), gpus=(0, 1), precision="FP32"))
    assert [g["gpus"] for g in two["instance_group"]] == [[0], [1]]
    assert {"key": ["precision_mode"], "value": ["FP32"]} in (
        two["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0]["parameters"])
    # Derived once more, the config is the same (the accelerator replaced, not added twice).
    again = gpu_config((tmp_path / "embedder" / "config.pbtxt").read_text(), cache_dir="/cache")
    assert again == (tmp_path / "embedder" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="onnxruntime"):
        gpu_config('name: "x"\nbackend: "python"\nmax_batch_size: 4\ndynamic_batching { }\n')


def test_the_cpu_configs_the_tests_serve_are_unchanged_by_the_gpu_path(tmp_path, model_repo):
    from visearch.triton_repo import main

    assert main([str(model_repo), str(tmp_path / "cpu")]) == 0
    assert main(["--gpu", str(model_repo), str(tmp_path / "gpu")]) == 0
    cpu = (tmp_path / "cpu" / "embedder" / "config.pbtxt").read_text()
    assert 'backend: "python"' in cpu and "KIND_CPU" in cpu and "optimization" not in cpu
    assert (tmp_path / "cpu" / "embedder" / "1" / "model.py").is_file()
    assert not list((tmp_path / "gpu").glob("*/*/model.py"))
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
