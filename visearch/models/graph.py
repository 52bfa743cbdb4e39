"""A linear projection appended to a served graph: L2(output @ W + b) as a new model file.

How a model version with a smaller or adapted descriptor is made without torch: `visearch models
reduce` (PCA, visearch/modeling/reduce.py) and catalog adaptation (learned whitening,
visearch/adapting.py) both write the source graph with MatMul + Add + L2 normalisation after its
`embeddings` output, the region outputs untouched. Needs onnx (imported when a graph is written).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .atomic import write_atomic

__all__ = ["allow_any_dim", "append_projection", "project"]


def project(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L2(x @ w + b): what the reduced graph computes from the source's descriptors."""
    y = x @ w + b
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def append_projection(src: Path, dst: Path, w: np.ndarray, b: np.ndarray, output: str = "embeddings") -> Path:
    """A copy of the ONNX model `src` whose `output` is L2(output @ w + b), written to `dst` (a file)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    raw = f"{output}_before_pca"
    for node in g.node:
        node.output[:] = [raw if o == output else o for o in node.output]
        node.input[:] = [raw if i == output else i for i in node.input]
    g.initializer.extend([numpy_helper.from_array(w, "pca_weight"), numpy_helper.from_array(b, "pca_bias"),
                          numpy_helper.from_array(np.array(1e-12, np.float32), "pca_eps")])
    g.node.extend([
        helper.make_node("MatMul", [raw, "pca_weight"], ["pca_projected"], name="pca_matmul"),
        helper.make_node("Add", ["pca_projected", "pca_bias"], ["pca_centred"], name="pca_add"),
        helper.make_node("ReduceL2", ["pca_centred"], ["pca_norm"], name="pca_norm", axes=[-1], keepdims=1),
        helper.make_node("Max", ["pca_norm", "pca_eps"], ["pca_norm_safe"], name="pca_norm_safe"),
        helper.make_node("Div", ["pca_centred", "pca_norm_safe"], [output], name="pca_l2"),
    ])
    out = next(o for o in g.output if o.name == output)
    batch = out.type.tensor_type.shape.dim[0].dim_param or "batch"
    out.CopyFrom(helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, int(w.shape[1])]))
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def allow_any_dim(config: Path, output: str = "embeddings") -> bool:
    """Declare `output` as [-1] in a config.pbtxt (versions of different dimension); True if it changed."""
    text = config.read_text(encoding="utf-8")
    pattern = re.compile(r'(name:\s*"' + re.escape(output) + r'"\s*data_type:\s*TYPE_FP32\s*dims:\s*)\[[^\]]*\]')
    new, n = pattern.subn(r"\1[ -1 ]", text)
    if n != 1:
        raise ValueError(f"{config}: no single {output!r} output entry to relax")
    if new == text:
        return False
    write_atomic(config, new)
    return True
