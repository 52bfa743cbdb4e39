"""The one place ONNX Runtime sessions are opened: the options every session of the project runs with.

Full graph optimisation, `threads` intra-op threads and one inter-op thread (None: ONNX Runtime's
own defaults, every core), on the execution providers given (default: the CPU). Imports nothing of
visearch, so the serving backend (`visearch.inference`) and offline work (`visearch.offline`:
evaluation, `visearch models reduce`, the benchmarks) can both open their sessions here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CPU = "CPUExecutionProvider"


def session_options(threads: int | None = None):
    """onnxruntime.SessionOptions: `threads` intra-op threads and one inter-op thread (None or 0: the
    defaults), full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def ort_session(path: Path | str, threads: int | None = None, providers: Sequence = (CPU,)):
    """An ONNX Runtime session of the model file `path` (`providers`: names or (name, options) pairs)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=list(providers))
