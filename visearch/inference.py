"""One inference interface, two implementations: in-process ONNX Runtime and Triton.

Both read the same model repository layout (`<name>/config.pbtxt`,
`<name>/<version>/model.onnx`, `<name>/<version>/meta.json`), so the embedded
default and production serve the very same files. Serving code never imports torch.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visearch.errors import FailedPrecondition, InvalidArgument, Unavailable
from visearch.models.record import META_FILE, ModelRecord
from visearch.models.repository import adapted_to, general_versions
from visearch.ortsession import ort_session
from visearch.settings import ORT_PROVIDER_NAMES, InferenceSettings, parse_ort_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMeta:
    """What a client needs to know to feed a model and trust its output."""

    name: str
    version: str
    input_name: str
    output_name: str
    input_size: int
    dim: int
    metric: str = "ip"
    architecture: str = ""
    pooling: str = ""
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_record(cls, name: str, version: str, record: ModelRecord | dict) -> ModelMeta:
        """The client's view of a model version's meta record (`visearch.models.ModelRecord`; a dict is
        read as one, strictly)."""
        if not isinstance(record, ModelRecord):
            record = ModelRecord.from_dict(record, f"model {name} version {version}")
        known = {"input_name", "output_name", "input_size", "dim", "metric", "architecture", "weights_sha256"}
        return cls(
            name=name,
            version=str(version),
            input_name=record.input_name,
            output_name=record.output_name,
            input_size=record.input_size,
            dim=record.dim,
            metric=record.metric or "ip",
            architecture=record.architecture,
            pooling=record.pooling or "",
            weights_sha256=record.weights_sha256 or "",
            extra={k: v for k, v in record.to_dict().items() if k not in known},
        )

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def region_outputs(self) -> list[str]:
        """Names of the model's region outputs (meta.json `regions`), empty when it has none."""
        return list((self.extra.get("regions") or {}).get("outputs") or [])


def model_version(tag: str) -> str:
    """The version part of a model tag ("embedder:3" -> "3"; "" when the tag has none)."""
    return tag.rpartition(":")[2] if ":" in tag else ""


def resolve_version(repo: Path, name: str, version: str = "") -> Path:
    """The version folder to serve: the pinned one, else the highest integer folder not adapted to one catalog."""
    model_dir = repo / name
    if version:
        path = model_dir / version
        if not (path / "model.onnx").is_file():
            raise FailedPrecondition(f"model {name} version {version} not found in {repo} (run `visearch models build`)")
        return path
    versions = general_versions(model_dir)  # a version adapted to one catalog is never the default
    if not versions:
        raise FailedPrecondition(f"no built version of model {name!r} in {repo}: run `visearch models build`")
    return model_dir / str(versions[-1])


def read_meta(repo: Path, name: str, version: str = "") -> ModelMeta:
    path = resolve_version(repo, name, version)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FailedPrecondition(f"{meta_file} is missing: rebuild the model with `visearch models build`")
    try:
        record = ModelRecord.read(meta_file)
    except ValueError as exc:
        raise FailedPrecondition(f"{exc}: rebuild the model with `visearch models build`") from None
    return ModelMeta.from_record(name, path.name, record)


class InferenceBackend(abc.ABC):
    """Runs a named model on a batch of named input tensors."""

    # Forwards this backend runs at once in this process (a warm-up runs that many, so each has
    # its memory ready before the first request).
    parallel_runs: int = 1

    @abc.abstractmethod
    async def metadata(self, model: str, version: str = "") -> ModelMeta:
        """The meta record of `version` ("" = the served default: the pinned or highest version)."""

    @abc.abstractmethod
    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str] | None = None, version: str = "") -> dict[str, np.ndarray]:
        """Run `model` (`version`, "" = the served default); returns the named `outputs`
        (default: the model's primary output only)."""

    @abc.abstractmethod
    async def ready(self, model: str) -> bool: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class WarmUp:
    """A service's warm-up, run once and to its end even when the caller waiting for it gives up
    (a readiness check's timeout): the next check waits for the same run, a failed run is retried."""

    def __init__(self, fn: Callable[[], Awaitable[None]]):
        self.fn = fn
        self.done = False
        self._task: asyncio.Future | None = None

    async def __call__(self) -> None:
        if self.done:
            return
        if self._task is None or (self._task.done() and (self._task.cancelled() or self._task.exception())):
            self._task = asyncio.ensure_future(self.fn())
        await asyncio.shield(self._task)
        self.done = True


# VISEARCH_ORT_PROVIDERS names -> ONNX Runtime's execution providers.
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
assert set(ORT_PROVIDERS) == set(ORT_PROVIDER_NAMES)


def ort_providers(names: Sequence[str] | str, available: Sequence[str], device_id: int = 0, trt_fp16: bool = True,
                  trt_cache_dir: str | Path = "") -> tuple[list[tuple[str, dict]], str]:
    """The (provider, options) list to open sessions with, from the names asked for ("tensorrt,cuda,cpu"),
    keeping only those `available` (onnxruntime.get_available_providers()) and the CPU when none is left;
    and a warning to log once when some were dropped ("" when none was). ValueError names an unknown one."""
    names = parse_ort_providers(names)
    options = {
        "cpu": {},
        "cuda": {"device_id": device_id},
        # Engines are built per model and input shape range (minutes each) and kept between starts.
        "tensorrt": {"device_id": device_id, "trt_fp16_enable": trt_fp16, "trt_engine_cache_enable": True,
                     "trt_engine_cache_path": str(trt_cache_dir or Path.home() / ".cache" / "visearch" / "tensorrt")},
    }
    chosen = [(ORT_PROVIDERS[n], options[n]) for n in names if ORT_PROVIDERS[n] in available]
    if not chosen:
        chosen = [(ORT_PROVIDERS["cpu"], {})]
    missing = [n for n in names if ORT_PROVIDERS[n] not in available]
    warning = ""
    if missing:
        warning = (f"ONNX Runtime execution providers asked for: {','.join(names)}; {', '.join(missing)} not available in "
                   f"this onnxruntime build (it has {', '.join(available) or 'none'}; CUDA and TensorRT need the `gpu` "
                   f"extra, onnxruntime-gpu): running on {', '.join(p for p, _ in chosen)}")
    return chosen, warning


class OnnxRuntimeBackend(InferenceBackend):
    """The embedded default: the model files run in this process, on the execution providers asked for
    (VISEARCH_ORT_PROVIDERS: the CPU by default; CUDA or TensorRT with onnxruntime-gpu)."""

    def __init__(self, repo: Path, versions: dict[str, str] | None = None, intra_op_threads: int = 1,
                 max_concurrent_runs: int = 0, providers: Sequence[str] | str = ("cpu",), device_id: int = 0,
                 trt_fp16: bool = True, trt_cache_dir: str | Path = ""):
        import onnxruntime as ort

        # Checked and resolved once, before any model loads: an unknown name fails here, at start, and
        # a provider this build lacks is said once, not at every session.
        self.asked = parse_ort_providers(providers)
        self.providers, warning = ort_providers(self.asked, ort.get_available_providers(), device_id, trt_fp16,
                                                trt_cache_dir)
        if warning:
            log.warning(warning)
        if any(name != ORT_PROVIDERS["cpu"] for name, _ in self.providers) and hasattr(ort, "preload_dlls"):
            # The CUDA and cuDNN libraries of onnxruntime-gpu's own extras (nvidia-* wheels, the `gpu` extra)
            # are found only once loaded; a system CUDA is found either way.
            try:
                ort.preload_dlls()
            except (OSError, RuntimeError) as exc:
                log.warning(f"ONNX Runtime could not preload the CUDA libraries: {exc}")
        # A provider the build has may still fail to start (onnxruntime-gpu without the CUDA libraries or a
        # GPU): ONNX Runtime then falls back by itself, which is said once too.
        self._start_failure_said = bool(warning)
        # What each loaded model really runs on (session.get_providers(): a provider that fails to start,
        # e.g. CUDA libraries missing, is left out there too), by model tag.
        self.providers_in_use: dict[str, list[str]] = {}
        self.repo = Path(repo)
        self.versions = versions or {}
        self.threads = intra_op_threads
        # Forwards at once in this process (0: one per core): callers beyond it wait their turn
        # instead of slicing the cores finer (oversubscribed forwards cost more CPU each).
        self.parallel_runs = max_concurrent_runs or max(1, (os.cpu_count() or 1) // max(1, intra_op_threads))
        self._runs = asyncio.Semaphore(self.parallel_runs)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.parallel_runs, thread_name_prefix="ort")
        self._sessions: dict[tuple[str, str], tuple[object, ModelMeta]] = {}
        # Sessions not running a forward, per (model, version). Each forward at once gets a session
        # of its own (made on first need, so at most max_concurrent_runs per model): two forwards
        # on one shared session measured about 3 % slower each than on two sessions.
        self._idle: dict[tuple[str, str], list] = {}
        self._default: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def _load(self, model: str, version: str):
        meta = read_meta(self.repo, model, version or self.versions.get(model, ""))
        # One intra-op thread per session measured fastest for these CNNs on 2 cores;
        # parallelism comes from processes, not threads inside one forward.
        path = self.repo / model / meta.version / "model.onnx"
        for name, options in self.providers:
            if name == ORT_PROVIDERS["tensorrt"]:
                Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        session = ort_session(path, self.threads, self.providers)
        in_use = self.providers_in_use[meta.tag] = session.get_providers()
        log.info("loaded model", extra={"model": meta.tag, "path": str(path), "providers": in_use})
        lost = [name for name, _ in self.providers if name not in in_use]
        if lost and not self._start_failure_said:
            self._start_failure_said = True
            log.warning(f"ONNX Runtime execution providers asked for: {','.join(self.asked)}; {', '.join(lost)} "
                        f"could not start (its own messages say why): {meta.tag} runs on {', '.join(in_use)}")
        return session, meta

    async def _get(self, model: str, version: str = ""):
        if version and not (version.isascii() and version.isdigit() and len(version) <= 9):
            raise InvalidArgument(f"model version {version!r} is not a version number")
        if not version:  # the served default, resolved once: the pinned or the highest version folder
            if model not in self._default:
                self._default[model] = resolve_version(self.repo, model, self.versions.get(model, "")).name
            version = self._default[model]
        key = (model, version)
        if key not in self._sessions:
            async with self._lock:
                if key not in self._sessions:
                    self._sessions[key] = await asyncio.to_thread(self._load, model, version)
                    self._idle[key] = [self._sessions[key][0]]
        return self._sessions[key]

    async def metadata(self, model: str, version: str = "") -> ModelMeta:
        return (await self._get(model, version))[1]

    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str] | None = None, version: str = "") -> dict[str, np.ndarray]:
        _, meta = await self._get(model, version)
        key = (model, meta.version)
        names = list(outputs or [meta.output_name])
        await self._runs.acquire()
        idle = self._idle[key]
        try:
            session = idle.pop() if idle else (await asyncio.to_thread(self._load, model, meta.version))[0]
        except BaseException:
            self._runs.release()
            raise
        loop = asyncio.get_running_loop()

        def finish() -> None:
            idle.append(session)
            self._runs.release()

        def done(_) -> None:  # in the forward's thread, once the forward has really ended
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # the loop is closed: the process is stopping
                pass

        # The session and the turn go back when the forward ends, not when its caller stops
        # waiting: a caller cancelled (deadline, disconnect) leaves the forward running in its
        # thread, and neither its session nor its core may be handed out before it is done.
        forward = self._executor.submit(session.run, names, inputs)
        forward.add_done_callback(done)
        got = await asyncio.wrap_future(forward)
        return dict(zip(names, got, strict=True))

    async def ready(self, model: str) -> bool:
        await self._get(model)
        return True


_NP_TO_TRITON = {np.dtype("uint8"): "UINT8", np.dtype("float32"): "FP32", np.dtype("int64"): "INT64",
                 np.dtype("int32"): "INT32", np.dtype("float16"): "FP16"}


def triton_inputs(inputs: dict[str, np.ndarray]):
    """numpy tensors -> tritonclient InferInput objects (contiguous, dtype checked)."""
    import tritonclient.grpc as tc

    out = []
    for name, arr in inputs.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NP_TO_TRITON:
            raise ValueError(f"input {name}: dtype {arr.dtype} has no Triton datatype here")
        ii = tc.InferInput(name, list(arr.shape), _NP_TO_TRITON[arr.dtype])
        ii.set_data_from_numpy(arr)
        out.append(ii)
    return out


class TritonBackend(InferenceBackend):
    """Production: models served by Triton over gRPC (dynamic batching happens there).

    The meta record comes from the model repository's meta.json when the repository
    is readable here, else from Triton's model metadata (shapes only).
    """

    def __init__(self, url: str, repo: Path | None = None, versions: dict[str, str] | None = None,
                 timeout: float = 10.0):
        import tritonclient.grpc.aio as tca

        self.url = url
        self.repo = Path(repo) if repo else None
        self.versions = versions or {}
        self.timeout = timeout
        self.client = tca.InferenceServerClient(url=url)
        self._meta: dict[str, ModelMeta] = {}

    async def _call(self, what: str, coro):
        from tritonclient.utils import InferenceServerException

        try:
            return await asyncio.wait_for(coro, timeout=self.timeout)
        except TimeoutError:
            raise Unavailable(f"triton at {self.url}: {what} timed out after {self.timeout}s") from None
        except InferenceServerException as exc:
            raise Unavailable(f"triton at {self.url}: {what} failed: {exc.message()}") from None

    async def metadata(self, model: str, version: str = "") -> ModelMeta:
        key = f"{model}:{version}"
        if key in self._meta:
            return self._meta[key]
        if version and not (version.isascii() and version.isdigit() and len(version) <= 9):
            raise InvalidArgument(f"model version {version!r} is not a version number")
        asked = version
        version = version or self.versions.get(model, "")
        try:
            md = await self._call("model metadata", self.client.get_model_metadata(model, model_version=version, as_json=True))
        except Unavailable as exc:
            if asked and await self.ready(model):  # the server is up and serves the model, not this version
                raise FailedPrecondition(f"model {model} version {asked} is not served by triton at {self.url}") from exc
            raise
        served = md.get("versions", ["1"])
        if self.repo:  # a version adapted to one catalog is never the default
            served = [v for v in served if adapted_to(self.repo / model / v) is None] or served
        served_version = version or max(served, key=int)
        if self.repo and (self.repo / model / served_version / "meta.json").is_file():
            meta = read_meta(self.repo, model, served_version)
        else:
            inp = md["inputs"][0]
            outp = next((o for o in md["outputs"] if o["name"] == "embeddings"), md["outputs"][0])
            if int(outp["shape"][-1]) < 1:  # declared [-1]: the versions differ in dimension
                raise FailedPrecondition(f"triton declares {model}'s {outp['name']} dimension as variable: give the "
                                         "model repository (VISEARCH_MODEL_REPOSITORY) so each version's meta.json "
                                         "says its own")
            meta = ModelMeta(name=model, version=served_version, input_name=inp["name"], output_name=outp["name"],
                             input_size=int(inp["shape"][1]), dim=int(outp["shape"][-1]))
        served_in = {i["name"]: i for i in md["inputs"]}
        if meta.input_name not in served_in:
            raise FailedPrecondition(f"triton serves {model}:{served_version} without input {meta.input_name!r}")
        self._meta[key] = meta
        return meta

    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str] | None = None, version: str = "") -> dict[str, np.ndarray]:
        import tritonclient.grpc as tc

        meta = await self.metadata(model, version)
        names = list(outputs or [meta.output_name])
        result = await self._call("infer", self.client.infer(model, triton_inputs(inputs), model_version=meta.version,
                                                              outputs=[tc.InferRequestedOutput(n) for n in names]))
        return {n: result.as_numpy(n) for n in names}

    async def ready(self, model: str) -> bool:
        try:
            return bool(await self._call("readiness", self.client.is_model_ready(model, self.versions.get(model, ""))))
        except Unavailable:
            return False

    async def close(self) -> None:
        await self.client.close()


def make_backend(settings: InferenceSettings) -> InferenceBackend:
    versions = {name: v for name, v in (("embedder", settings.embedder_version), ("detector", settings.detector_version)) if v}
    if settings.backend == "triton":
        return TritonBackend(settings.triton_url, settings.model_repository, versions, settings.triton_timeout_seconds)
    return OnnxRuntimeBackend(settings.model_repository, versions, settings.ort_intra_op_threads,
                              settings.ort_max_concurrent_runs, settings.ort_providers, settings.ort_device_id,
                              settings.ort_trt_fp16, settings.ort_trt_cache_dir)
