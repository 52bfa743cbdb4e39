"""What the benchmarks share: ONNX Runtime sessions as served, a mesh started with extra settings, results on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path


def ort_session(repo: Path, name: str, version: str = ""):
    """(session, meta) of a served model, one intra-op thread, as the embedded backend runs it."""
    import onnxruntime as ort

    from visearch.inference import read_meta, resolve_version

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = resolve_version(Path(repo), name, version) / "model.onnx"
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), read_meta(Path(repo), name)


def mesh_up(data: Path, env: dict[str, str], **kw) -> dict:
    """`mesh.up` with extra VISEARCH_* settings for its processes, set for the start only (this
    process's environment is left as it was, for later benchmarks and tests in it)."""
    from visearch import mesh

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return mesh.up(data, log=lambda m: None, **kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_result(out: Path | None, result: dict, markdown: str) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "result.md").write_text(markdown)
