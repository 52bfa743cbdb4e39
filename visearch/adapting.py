"""Catalog adaptation without labels: a projection of the descriptor learned from one catalog's own
objects, served as a model version of that catalog alone (`visearch adapt --catalog C`, docs/ADAPT.md).

A catalog of products no model was trained on gets a descriptor fitted to it, with no label:

1. A sample of the catalog's stored objects (up to `max_objects`) is embedded by the full-dimension
   model (the served reduction's source: `base_version`), each as stored and as `views` made-up views
   (visearch.views: a random resized crop, rotation, perspective, colour, blur, an occluding patch,
   as a shopper's photo differs from a catalog's).
2. Learned whitening (Radenovic, Tolias and Chum, "CNN image retrieval learns from BoW", ECCV 2016,
   "Lw"), with each object and its views as the matching pairs: the covariance of the pairs'
   differences is whitened away (what a photo of the same object changes), then the whitened
   catalog is rotated to its principal directions and cut to the catalog's dimension (`fit`).
   Closed form, numpy: seconds for thousands of objects; the views' forwards are the cost.
3. The projection is appended to the base graph (visearch.models.graph, as `visearch models reduce`
   does for the PCA) and written as a new version whose meta record names the catalog (`adaptation`):
   `write_version`. Such a version is never a model's default (visearch.models.repository
   .general_versions); the catalog moves to it by the blue/green re-embedding.

The settings (views, shrinkage, dimension) were chosen on the train hold-out TH-CD and reported on
CD (`python -m bench.adapt_eval`). The worker's job is services/worker/adapt.py.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visearch import imaging
from visearch.models.graph import allow_any_dim, append_projection, project
from visearch.models.record import META_FILE, ModelRecord
from visearch.models.repository import MODEL_FILE, read_record, versions
from visearch.views import TRAIN_VIEWS, made_up_view, seed_of

__all__ = ["DEFAULT_MAX_OBJECTS", "DEFAULT_VIEWS", "SHRINK", "base_version", "fit", "target_dim", "view_bytes",
           "view_of", "write_version"]

DEFAULT_VIEWS = 4
DEFAULT_MAX_OBJECTS = 5000
MAX_VIEWS = 16
MAX_OBJECTS = 50_000
# Ridge added to the pairs' covariance, as a fraction of its mean eigenvalue (TH-CD: flat from 0.001 to 0.03).
SHRINK = 0.01
DEFAULT_DIM = 128
PARITY_TOL = 1e-3


def fit(x: np.ndarray, views: Sequence[np.ndarray], dim: int, shrink: float = SHRINK
        ) -> tuple[np.ndarray, np.ndarray]:
    """(W [C, dim], b [dim]) with L2(x @ W + b) the adapted descriptor, learned from descriptors `x`
    [n, C] of n objects and `views`, each [n, C]: the same objects seen otherwise (row i of each view is
    object i). Learned whitening: W = C_S^-1/2 R, C_S the covariance of x_i - v_i (plus `shrink` times
    its mean eigenvalue), R the top `dim` principal directions of the whitened, centred x."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"adaptation needs descriptors of 2 or more objects, got shape {x.shape}")
    if not views:
        raise ValueError("adaptation needs at least one made-up view per object")
    if not 0 < dim <= x.shape[1]:
        raise ValueError(f"adapted dimension {dim} is outside 1..{x.shape[1]}")
    for v in views:
        if np.shape(v) != x.shape:
            raise ValueError(f"a view's descriptors have shape {np.shape(v)}, the objects' {x.shape}")
    mu = x.mean(0)
    diffs = np.concatenate([x - np.asarray(v, np.float64) for v in views])
    cs = diffs.T @ diffs / len(diffs)
    cs += shrink * np.trace(cs) / len(cs) * np.eye(len(cs))
    vals, vecs = np.linalg.eigh(cs)
    w1 = (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T  # C_S^-1/2
    xw = (x - mu) @ w1
    e, r = np.linalg.eigh(xw.T @ xw / len(xw))
    w = w1 @ r[:, np.argsort(e)[::-1][:dim]]
    return w.astype(np.float32), (-mu @ w).astype(np.float32)


def view_of(img, box, seed: int, quality: int = 90) -> bytes:
    """A made-up view (visearch.views, the training views) of the object at `box` (pixels; None: the
    whole image) of a decoded image, as JPEG bytes to embed like any photo."""
    if box is not None:
        img = imaging.crop(img, box)
    out = io.BytesIO()
    made_up_view(img, seed, TRAIN_VIEWS).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def view_bytes(data: bytes, box, seed: int, quality: int = 90) -> bytes:
    """`view_of` an encoded image."""
    return view_of(imaging.decode_image(data), box, seed, quality)


def view_seed(catalog: str, object_id: str, k: int) -> int:
    return seed_of("adapt", catalog, object_id, k)


def base_version(record: ModelRecord) -> int:
    """The full-dimension version a catalog's model derives from: a reduction's or an adaptation's
    source, else the version itself."""
    for key in ("adaptation", "reduction"):
        derived = record.get(key)
        if isinstance(derived, dict) and derived.get("source_version"):
            return int(derived["source_version"])
    return int(record.version)


def target_dim(record: ModelRecord, base: ModelRecord) -> int:
    """The adapted descriptor's dimension: the catalog's model's when it is reduced (its vectors keep
    their size in the store), else DEFAULT_DIM (at most the base's)."""
    return int(record.dim) if int(record.dim) < int(base.dim) else min(DEFAULT_DIM, int(base.dim))


def _claim_version(model_dir: Path) -> int:
    """A new version number, claimed by making its folder (mkdir is atomic: two adaptations at once
    get two numbers)."""
    n = max(versions(model_dir), default=0) + 1
    while True:
        try:
            (model_dir / str(n)).mkdir()
            return n
        except FileExistsError:
            n += 1


def _ort_outputs(path: Path, record: ModelRecord, inputs: np.ndarray) -> np.ndarray:
    from visearch.ortsession import ort_session

    session = ort_session(path, 1)
    return session.run([record.output_name], {record.input_name: inputs})[0]


def write_version(repo: Path, name: str, source: int, w: np.ndarray, b: np.ndarray, catalog: str,
                  fitted: dict, check_inputs: np.ndarray) -> ModelRecord:
    """Write `<repo>/<name>/<new>`: version `source`'s graph with L2(output @ w + b) after its
    embeddings, its meta record saying which catalog it serves (`adaptation`). Checked before it is
    published: on `check_inputs` (model inputs, uint8 NHWC), the new graph gives the numpy projection
    of the source graph's output within PARITY_TOL. The record is written before the graph, so the
    version is never seen without it (a version without its record would read as general)."""
    model_dir = Path(repo) / name
    src_dir = model_dir / str(source)
    src = read_record(repo, name, source)
    number = _claim_version(model_dir)
    dst = model_dir / str(number)
    tmp = dst / f".{MODEL_FILE}.tmp{os.getpid()}"
    try:
        append_projection(src_dir / MODEL_FILE, tmp, w, b, src.output_name or "embeddings")
        diff = float(np.abs(_ort_outputs(tmp, src, check_inputs)
                            - project(_ort_outputs(src_dir / MODEL_FILE, src, check_inputs), w, b)).max())
        if not diff < PARITY_TOL:
            raise RuntimeError(f"the adapted graph differs from the numpy projection by {diff:.2e}")
        from visearch.checksum import sha256_file

        record = src.derive(
            version=number, id=f"{src.id}-adapted-{catalog}-d{w.shape[1]}", dim=int(w.shape[1]),
            model_sha256=sha256_file(tmp), parity_max_abs_diff=diff,
            adaptation={"catalog": catalog, "source_version": source, "source_sha256": src.model_sha256,
                        "dim": int(w.shape[1]), "method": "learned whitening (Lw) from made-up views of the "
                        "catalog's objects, in the graph (MatMul + Add + L2)", "shrink": SHRINK,
                        "fitted_at": round(time.time(), 3), **fitted})
        record.write(dst)
        os.replace(tmp, dst / MODEL_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not (dst / MODEL_FILE).is_file():
            (dst / META_FILE).unlink(missing_ok=True)
            dst.rmdir()
        raise
    allow_any_dim(model_dir / "config.pbtxt")  # versions of different dimension (already so after a reduction)
    return record

