"""The inference backends: ONNX Runtime for real; Triton as far as it goes without a server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from visearch.errors import FailedPrecondition, Unavailable
from visearch.inference import OnnxRuntimeBackend, TritonBackend, read_meta, resolve_version, triton_inputs


def test_onnxruntime_backend_runs_the_repository_model(model_repo):
    backend = OnnxRuntimeBackend(model_repo)
    meta = asyncio.run(backend.metadata("embedder"))
    assert meta.input_name == "images" and meta.output_name == "embeddings" and meta.dim > 0
    batch = np.random.default_rng(0).integers(0, 256, (2, meta.input_size, meta.input_size, 3), dtype=np.uint8)
    out = asyncio.run(backend.infer("embedder", {"images": batch}))["embeddings"]
    assert out.shape == (2, meta.dim) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)


def test_version_resolution(model_repo, tmp_path):
    assert resolve_version(model_repo, "embedder").name.isdigit()
    with pytest.raises(FailedPrecondition, match="version 99 not found"):
        read_meta(model_repo, "embedder", "99")
    with pytest.raises(FailedPrecondition, match="visearch models build"):
        resolve_version(tmp_path, "embedder")


def test_explicit_versions_share_the_default_session_and_are_checked(model_repo):
    from visearch.errors import InvalidArgument

    backend = OnnxRuntimeBackend(model_repo)
    default = asyncio.run(backend.metadata("embedder"))
    assert asyncio.run(backend.metadata("embedder", default.version)) is default  # one session, not two
    assert len(backend._sessions) == 1
    for bad in ("../detector/1", "1/../../x", "latest"):
        with pytest.raises(InvalidArgument, match="not a version number"):
            asyncio.run(backend.metadata("embedder", bad))
    with pytest.raises(FailedPrecondition, match="version 99 not found"):
        asyncio.run(backend.metadata("embedder", "99"))


def test_triton_inputs_carry_names_shapes_and_types():
    arr = np.zeros((2, 8, 8, 3), np.uint8)
    (ii,) = triton_inputs({"images": arr})
    assert ii.name() == "images" and ii.shape() == [2, 8, 8, 3] and ii.datatype() == "UINT8"
    with pytest.raises(ValueError, match="no Triton datatype"):
        triton_inputs({"x": np.zeros(3, np.complex64)})


def test_triton_backend_unreachable_is_unavailable_quickly(model_repo):
    async def go():
        backend = TritonBackend("127.0.0.1:1", repo=model_repo, timeout=2.0)
        t0 = time.monotonic()
        assert await backend.ready("embedder") is False
        with pytest.raises(Unavailable, match="triton at 127.0.0.1:1"):
            await backend.infer("embedder", {"images": np.zeros((1, 4, 4, 3), np.uint8)})
        await backend.close()
        return time.monotonic() - t0

    assert asyncio.run(go()) < 10


@pytest.mark.parametrize("limit", [1, 2])
def test_onnxruntime_backend_bounds_the_forwards_run_at_once(model_repo, limit):
    """More concurrent callers than cores queue for a forward instead of slicing the cores finer, and
    each forward at once runs on a session of its own (at most `limit` sessions are made)."""
    backend = OnnxRuntimeBackend(model_repo, max_concurrent_runs=limit)
    active, peak, busy, made = [0], [0], set(), []
    load = backend._load
    # Forwards start in groups of `limit`: whether two overlap does not depend on how long a session
    # takes to load against a forward (on a loaded machine one session could serve every forward
    # while the second loads). A backend that ran fewer at once would break the barrier.
    together = threading.Barrier(limit, timeout=60)

    class Counting:  # a real session, its runs counted while they execute
        def __init__(self, session):
            self.session = session

        def run(self, names, inputs):
            assert self not in busy, "two forwards at once on one session"
            busy.add(self)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            try:
                together.wait()
                return self.session.run(names, inputs)
            finally:
                active[0] -= 1
                busy.discard(self)

    def counted_load(model, version):
        session, meta = load(model, version)
        made.append(Counting(session))
        return made[-1], meta

    backend._load = counted_load

    async def run():
        meta = await backend.metadata("detector")
        x = np.zeros((1, meta.input_size, meta.input_size, 3), np.uint8)
        outs = await asyncio.gather(*(backend.infer("detector", {meta.input_name: x}) for _ in range(6)))
        return peak[0], outs

    peak, outs = asyncio.run(run())
    assert peak == limit and len(outs) == 6 and len(made) == limit
    assert all(np.array_equal(o[k], outs[0][k]) for o in outs for k in outs[0]), "every session gives the same answer"


def test_warm_up_readies_a_session_for_each_forward_at_once(model_repo):
    """The services' warm-up runs as many forwards at once as their backend allows, so no request
    after SERVING pays for loading a session or planning its memory."""
    from visearch.detection_model import DetectionModel
    from visearch.embedding_model import Embedder
    from visearch.settings import DetectionSettings

    async def go():
        backend = OnnxRuntimeBackend(model_repo, max_concurrent_runs=2)
        assert backend.parallel_runs == 2
        assert await Embedder(backend, max_batch=8).ready()
        assert await DetectionModel(backend, DetectionSettings(detection_port=0)).ready()
        return {model: len(idle) for (model, _), idle in backend._idle.items()}

    assert asyncio.run(go()) == {"embedder": 2, "detector": 2}


def test_a_cancelled_forward_keeps_its_session_and_turn_until_it_ends(model_repo):
    """A caller that stops waiting (deadline, disconnect) leaves its forward running in a thread:
    neither that session nor that turn is handed out again before the forward has ended."""
    backend = OnnxRuntimeBackend(model_repo, max_concurrent_runs=1)
    spans, load = [], backend._load

    class Slow:  # a real session whose forwards take at least 0.4 s, their spans recorded
        def __init__(self, session):
            self.session = session

        def run(self, names, inputs):
            t0 = time.monotonic()
            time.sleep(0.4)
            out = self.session.run(names, inputs)
            spans.append((t0, time.monotonic()))
            return out

    backend._load = lambda model, version: (lambda s, m: (Slow(s), m))(*load(model, version))

    async def go():
        meta = await backend.metadata("detector")
        x = {meta.input_name: np.zeros((1, meta.input_size, meta.input_size, 3), np.uint8)}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(backend.infer("detector", x), 0.1)
        await backend.infer("detector", x)
        return len(backend._idle[("detector", meta.version)])

    assert asyncio.run(go()) == 1, "one session made and returned"
    (first, second) = sorted(spans)
    assert second[0] >= first[1], "the second forward started only after the cancelled one ended"


def test_warm_up_runs_to_its_end_when_its_caller_gives_up():
    from visearch.inference import WarmUp

    runs = []

    async def warm():
        runs.append(1)
        await asyncio.sleep(0.3)

    async def go():
        w = WarmUp(warm)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w(), 0.05)  # a readiness check's timeout
        await w()  # the next check waits for the same run
        await w()
        return w.done

    assert asyncio.run(go()) and runs == [1]


def test_cuda_asked_on_a_cpu_build_runs_on_the_cpu_with_one_warning(model_repo, caplog):
    """VISEARCH_ORT_PROVIDERS=cuda,cpu on an onnxruntime without CUDA (this machine's): one warning line
    naming what was asked and what there is, every model on CPUExecutionProvider, the CPU's embeddings."""
    import onnxruntime as ort

    from visearch.inference import make_backend
    from visearch.settings import InferenceSettings

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is checked where it has not")
    async def embed(backend):
        meta = await backend.metadata("embedder")
        x = np.random.default_rng(1).integers(0, 256, (3, meta.input_size, meta.input_size, 3), dtype=np.uint8)
        # Two forwards at once (two sessions) and the detector too: still one warning.
        out = await asyncio.gather(*(backend.infer("embedder", {meta.input_name: x}) for _ in range(2)))
        detector = await backend.metadata("detector")
        return meta, detector, out[0][meta.output_name]

    cpu_meta, _, cpu = asyncio.run(embed(OnnxRuntimeBackend(model_repo, max_concurrent_runs=2)))
    with caplog.at_level("WARNING", logger="visearch.inference"):
        backend = make_backend(InferenceSettings(model_repository=model_repo, ort_providers="cuda,cpu",
                                                 ort_max_concurrent_runs=2))
        meta, detector, got = asyncio.run(embed(backend))
    warnings = [r for r in caplog.records if r.name == "visearch.inference" and r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert "\n" not in line and "cuda,cpu" in line and "cuda not available" in line
    assert "CPUExecutionProvider" in line and ", ".join(ort.get_available_providers()) in line
    assert backend.providers == [("CPUExecutionProvider", {})]
    assert backend.providers_in_use == {meta.tag: ["CPUExecutionProvider"], detector.tag: ["CPUExecutionProvider"]}
    assert meta == cpu_meta and np.array_equal(got, cpu)


def test_a_provider_that_fails_to_start_is_said_once_and_recorded(model_repo, caplog, monkeypatch):
    """onnxruntime-gpu lists CUDA even where it cannot start (no driver, no GPU: seen with onnxruntime-gpu
    1.31 on this machine): ONNX Runtime falls back to the CPU by itself; the backend says so in one line
    and records what each model really runs on. Here this build is made to list CUDA."""
    import warnings

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level("WARNING", logger="visearch.inference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own: CUDA is not in this build
        backend = OnnxRuntimeBackend(model_repo, providers="cuda,cpu", max_concurrent_runs=2)
        assert [p for p, _ in backend.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]

        async def go():
            meta = await backend.metadata("embedder")
            x = np.zeros((1, meta.input_size, meta.input_size, 3), np.uint8)
            await asyncio.gather(*(backend.infer("embedder", {meta.input_name: x}) for _ in range(2)))
            return meta, await backend.metadata("detector")

        meta, detector = asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if r.name == "visearch.inference" and r.levelname == "WARNING"]
    assert len(said) == 1 and "CUDAExecutionProvider could not start" in said[0], said
    assert f"{meta.tag} runs on CPUExecutionProvider" in said[0]
    assert backend.providers_in_use == {meta.tag: ["CPUExecutionProvider"], detector.tag: ["CPUExecutionProvider"]}


def test_provider_names_map_to_onnxruntime_s_with_their_options(tmp_path):
    from visearch.inference import ort_providers

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen, warning = ort_providers("tensorrt,cuda,cpu", every, device_id=1, trt_fp16=False, trt_cache_dir=tmp_path)
    assert warning == "" and chosen == [
        ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": False, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": str(tmp_path)}),
        ("CUDAExecutionProvider", {"device_id": 1}),
        ("CPUExecutionProvider", {})]
    # Only those the build has are kept, in the order asked; none left: the CPU.
    chosen, warning = ort_providers(["tensorrt", "cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [p for p, _ in chosen] == ["CUDAExecutionProvider"] and "tensorrt not available" in warning
    chosen, warning = ort_providers("tensorrt", ["CPUExecutionProvider"])
    assert chosen == [("CPUExecutionProvider", {})] and warning.endswith("running on CPUExecutionProvider")
    assert ort_providers(" CPU ", ["CPUExecutionProvider"]) == ([("CPUExecutionProvider", {})], "")


def test_an_unknown_provider_is_refused_at_start(model_repo):
    """A misspelt provider stops the service before it serves, naming it and what is accepted."""
    import os
    import subprocess
    import sys

    from pydantic import ValidationError

    from visearch.settings import EmbeddingSettings, InferenceSettings

    for bad in ("cdua", "cuda,cuda", "", "cpu,gpu"):
        with pytest.raises(ValidationError, match="execution provider"):
            InferenceSettings(ort_providers=bad)
    with pytest.raises(ValueError, match="'cdua'.*expected a comma-separated list of tensorrt, cuda, cpu"):
        OnnxRuntimeBackend(model_repo, providers="cdua")
    assert EmbeddingSettings(embedding_port=1, ort_providers="TensorRT, cuda,cpu").ort_providers == (
        "tensorrt", "cuda", "cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_EMBEDDING_PORT="0", VISEARCH_AUTH="off", VISEARCH_ORT_PROVIDERS="cuda,cdua")
    out = subprocess.run([sys.executable, "-m", "services.embedding"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "unknown ONNX Runtime execution provider 'cdua'" in out.stderr, out.stderr[-2000:]
