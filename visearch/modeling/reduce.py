"""A smaller descriptor in the graph: PCA of a served embedder's output, as a new model version.

    visearch models reduce [--dim 128] [--source-version N]

The new version is the source graph with MatMul + Add + L2 normalisation after its
`embeddings` output (the region outputs untouched), fitted on the source's descriptors of
the grocery train photos (never a val photo). Measured by `python -m bench.dimension`
(docs/PERFORMANCE.md): PCA to 128 dimensions without whitening keeps the fine-tuned
descriptor's mAP on P1, P3 and the train hold-out (whitening lowers it), for a tenth of the
bytes per vector in the store and in every message that carries one.

A reduced version is a new version of the same model: catalogs keep the version that made
their vectors, and `visearch reembed --catalog NAME` moves one to it (docs/GENERATIONS.md). The
model's config.pbtxt then declares the embeddings output as [-1] (versions differ in
dimension; meta.json of each version says which). Needs numpy, onnx and ONNX Runtime only.

A fitted basis can come with the repository (`params/embedder-pca128.npz`, `pack_reduction`): it
holds the source model's descriptors of REFERENCE_IMAGES pictures made in code
(`reference_images`), and a build uses it for a source model that gives those descriptors back
within REFERENCE_TOL (the same function), whatever its file's bytes: an export's bytes move with
the machine (the region outputs are fitted through multi-threaded float sums, so their last bits
follow the thread count and the CPU) while its descriptor does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visearch.checksum import sha256_file
from visearch.models.graph import allow_any_dim, append_projection, project
from visearch.models.record import ModelRecord
from visearch.models.repository import versions as built_versions
from visearch.packs import PackError, provenance, read_pack, write_pack

DEFAULT_DIM = 128
PARITY_TOL = 1e-4
PARITY_PHOTOS = 16
REFERENCE_IMAGES = 8  # pictures made in code whose source descriptors a pack records (`reference_images`)
REFERENCE_TOL = 1e-4  # max |difference| of those L2-normalised descriptors for the same function


def pack_name(name: str, dim: int, power: float = 0.0) -> str:
    """The file under params/ of a fitted PCA basis (`visearch models pack` writes it)."""
    return f"{name}-pca{dim}" + (f"w{power:g}" if power else "") + ".npz"


def reference_images(size: int, n: int = REFERENCE_IMAGES, seed: int = 0) -> np.ndarray:
    """`n` uint8 NHWC pictures [n, size, size, 3] made in integer arithmetic alone, so the same bytes on
    every machine and numpy version: a two-colour gradient, rectangles, a disc, a checkered patch and
    a little hashed noise each, drawn from `seed` (no dataset needed)."""
    state = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF

    def draw(k: int) -> int:  # splitmix64: an integer in 0..k-1
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (z ^ (z >> 31)) % k

    yy, xx = np.mgrid[0:size, 0:size].astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        c0 = np.array([draw(256) for _ in range(3)], np.int64)
        c1 = np.array([draw(256) for _ in range(3)], np.int64)
        ax, ay = draw(5) - 2, draw(5) - 2
        t = ax * xx + ay * yy
        t = (t - t.min()) * 255 // max(1, int(t.max() - t.min()))
        img = (c0 * (255 - t[..., None]) + c1 * t[..., None]) // 255
        for _ in range(2 + draw(5)):  # rectangles
            x0, y0 = draw(size), draw(size)
            x1, y1 = min(size, x0 + 8 + draw(size // 2)), min(size, y0 + 8 + draw(size // 2))
            img[y0:y1, x0:x1] = [draw(256) for _ in range(3)]
        cx, cy, r = draw(size), draw(size), 10 + draw(size // 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = [draw(256) for _ in range(3)]
        x0, y0, cell = draw(size // 2), draw(size // 2), 4 + draw(12)
        patch = ((xx // cell + yy // cell) % 2 == 0) & (xx >= x0) & (xx < x0 + size // 3) & (yy >= y0) & (yy < y0 + size // 3)
        img[patch] = 255 - img[patch]
        h = (xx * 73856093 ^ yy * 19349663 ^ (i + 1) * 83492791) & 0xFFFF
        img = img + (h % 17 - 8)[..., None]
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images


def reference_outputs(model: Path, meta: dict, images: np.ndarray | None = None) -> np.ndarray:
    """The model's descriptors (L2-normalised again, float32) of `images` (default: `reference_images`
    at its input size), run as served on one thread."""
    if images is None:
        images = reference_images(int(meta["input_size"]))
    sess = cpu_session(model)
    y = sess.run([meta.get("output_name") or "embeddings"], {sess.get_inputs()[0].name: images})[0].astype(np.float64)
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def reference_record(size: int, output: str = "embeddings") -> dict:
    """What a pack records of its reference images (`reference_images`)."""
    images = reference_images(size)
    return {"images": len(images), "size": size, "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
            "output": output, "made_by": "visearch.modeling.reduce.reference_images", "tolerance": REFERENCE_TOL}


def packed_basis(pack: Path, source_sha256: str, dim: int, power: float = 0.0, *, source_model: Path | None = None,
                 source_meta: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """(W, b, its reduction record, how the source was matched) of a packed basis fitted on the model
    whose ONNX file is `source_model` (sha256 `source_sha256`, meta record `source_meta`); PackError when
    the pack is missing, altered (SHA256SUMS), of another dimension, or fitted on another model.

    The source matches when its file has the sha256 the pack records, or when it gives the pack's
    reference outputs back within REFERENCE_TOL (max |difference| of the L2-normalised descriptors of
    the reference images): the same function serialised otherwise."""
    arrays, meta = read_pack(pack)
    if int(meta.get("dim", -1)) != dim or float(meta.get("whitening_power", -1)) != power:
        raise PackError(f"{pack} is PCA {meta.get('dim')} (power {meta.get('whitening_power')}), not {dim} ({power})")
    w, b = arrays["weight"], arrays["bias"]
    if w.shape[1] != dim or b.shape != (dim,):
        raise PackError(f"{pack} holds a {w.shape} basis, not one to {dim} dimensions")
    if meta.get("source_sha256") == source_sha256:
        return w, b, meta, "its very model file"
    other = f"{pack} was fitted on the model {str(meta.get('source_sha256'))[:12]}..., not on {source_sha256[:12]}..."
    ref, want = meta.get("reference") or {}, arrays.get("reference_outputs")
    if source_model is None or want is None or not ref:
        raise PackError(other + ("" if source_model is None else " (and it records no reference outputs to compare)"))
    src_meta = source_meta or {}
    size = int(src_meta.get("input_size", -1))
    if size != int(ref.get("size", -2)) or (src_meta.get("output_name") or "embeddings") != ref.get("output"):
        raise PackError(f"{other} (that model takes {size}-pixel images, the pack's reference outputs are of "
                        f"{ref.get('size')}-pixel ones)")
    images = reference_images(size, int(ref.get("images", REFERENCE_IMAGES)))
    if hashlib.sha256(images.tobytes()).hexdigest() != ref.get("images_sha256"):
        raise PackError(f"{other} (this code's reference images are not the ones its reference outputs are of)")
    got = reference_outputs(Path(source_model), src_meta, images)
    if got.shape != want.shape:
        raise PackError(f"{other} (its descriptor is {got.shape[1]}-d, the pack's reference is {want.shape[1]}-d)")
    diff = float(np.abs(got.astype(np.float64) - want).max())
    if not diff <= REFERENCE_TOL:
        raise PackError(f"{other} (their descriptors of the {len(images)} reference images differ by {diff:.1e}, "
                        f"> {REFERENCE_TOL:g})")
    return w, b, meta, (f"the same function as the model it was fitted on (max |difference| {diff:.1e} on the "
                        f"{len(images)} reference images)")


def pack_reduction(version_dir: Path, out: Path) -> str:
    """Pack the PCA basis of a reduced version (its graph's pca_weight and pca_bias, exactly, with
    its reduction record) as `out`, with its source version's descriptors of the reference images
    (`reference_outputs`: what lets a build use the pack for a model file of the same function);
    returns the pack's sha256. The source version must be the one the basis was fitted on."""
    import onnx
    from onnx import numpy_helper

    version_dir = Path(version_dir)
    meta = ModelRecord.read(version_dir).to_dict()
    if "reduction" not in meta:
        raise ValueError(f"{version_dir} is not a reduced version")
    red = meta["reduction"]
    src_dir = version_dir.parent / str(red["source_version"])
    if sha256_file(src_dir / "model.onnx") != red["source_sha256"]:
        raise ValueError(f"{src_dir} is no longer the model {version_dir} was reduced from: reduce it again first")
    src_meta = ModelRecord.read(src_dir).to_dict()
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(version_dir / "model.onnx")).graph.initializer
             if i.name in ("pca_weight", "pca_bias")}
    # What it was fitted on, not how this copy got its basis.
    record = {k: v for k, v in red.items() if k not in ("basis_from", "basis_check")}
    record["reference"] = reference_record(int(src_meta["input_size"]), src_meta.get("output_name") or "embeddings")
    refs = reference_outputs(src_dir / "model.onnx", src_meta)
    return write_pack(out, {"weight": inits["pca_weight"], "bias": inits["pca_bias"], "reference_outputs": refs}, record)


def default_fit_paths() -> list[Path]:
    """What the served PCA is fitted on by default: every grocery train photo (never a val photo)."""
    from visearch.datasets import grocery_root, grocery_split

    return [p.path for p in grocery_split(grocery_root(), "train")]


def fit_pca(x: np.ndarray, dim: int, power: float = 0.0, eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """(W [C, dim], b [dim]) with x @ W + b = diag(l^(-power/2)) V_dim^T (x - mu): PCA of rows `x`, top `dim`
    directions, each divided by its standard deviation to the power `power` (0: projection only; 1: whitened)."""
    x = np.asarray(x, np.float64)
    if not 0 < dim <= x.shape[1]:
        raise ValueError(f"PCA dimension {dim} is outside 1..{x.shape[1]}")
    mu = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x - mu, rowvar=False))
    top = np.argsort(vals)[::-1][:dim]
    w = vecs[:, top] / np.power(np.maximum(vals[top], eps), power / 2)
    return w.astype(np.float32), (-mu @ w).astype(np.float32)


def cpu_session(path: Path):
    """An ONNX Runtime session on one intra-op thread, as the embedded backend runs models."""
    from visearch.ortsession import ort_session

    return ort_session(path, 1)


def embed_paths(model: Path, meta: dict, paths: Sequence[Path], progress: Callable[[str], None], batch: int = 32
                ) -> np.ndarray:
    """The model's descriptors of image files, input prepared exactly as served."""
    from visearch.offline import OfflineEmbedder

    model = OfflineEmbedder(path=model, input_size=int(meta["input_size"]), threads=1,
                            output=meta.get("output_name") or "embeddings")
    return model.embed_paths(paths, batch, every=20,
                             progress=lambda done, total: progress(f"  {done}/{total} photos embedded"))


def reduce_embedder(repo: Path, name: str = "embedder", source_version: int | None = None, dim: int = DEFAULT_DIM,
                    power: float = 0.0, fit_paths: Sequence[Path] | None = None,
                    progress: Callable[[str], None] = print, params: Path | None = None) -> dict:
    """Write `<repo>/<name>/<source + 1>`: the source version with PCA to `dim` in its graph; returns its meta.

    The source is `source_version`, else the highest version that is not itself a reduction. Fitted
    on `fit_paths` (default: every grocery train photo). Idempotent: an up-to-date reduction (same
    source model, dim and power) is kept as it is; a stale one (the source was rebuilt) is replaced;
    a folder holding some other model is never overwritten. `params`: a folder of packed bases
    (`pack_name`); with the default fit, a basis packed there for this source model (its ONNX file's
    sha256, or the same function: `packed_basis`) is used instead of fitting it again (which embeds
    every fit photo).
    """
    repo = Path(repo)
    model_dir = repo / name
    versions = built_versions(model_dir)
    metas = {v: ModelRecord.read(model_dir / str(v)).to_dict() for v in versions
             if (model_dir / str(v) / "meta.json").is_file()}
    if source_version is None:
        plain = [v for v in versions if not {"reduction", "adaptation"} & set(metas.get(v, {}))]
        if not plain:
            raise FileNotFoundError(f"no {name} version to reduce in {model_dir}: run `visearch models build`")
        source_version = plain[-1]
    src_dir = model_dir / str(source_version)
    if source_version not in metas:
        raise FileNotFoundError(f"{src_dir} has no model.onnx and meta.json")
    src_meta = metas[source_version]
    src_sha = src_meta.get("model_sha256") or sha256_file(src_dir / "model.onnx")
    if not 0 < dim < int(src_meta["dim"]):
        raise ValueError(f"cannot reduce {name}/{source_version} ({src_meta['dim']}-d) to {dim} dimensions")
    target = source_version + 1
    dst_dir = model_dir / str(target)
    want = {"source_version": source_version, "source_sha256": src_sha, "dim": dim, "whitening_power": power}
    if (dst_dir / "model.onnx").is_file():  # (a folder left empty by a failed run is free)
        have = metas.get(target, {}).get("reduction")
        if have is None:
            raise FileExistsError(f"{dst_dir} holds a model that is not a reduction of version {source_version}: "
                                  "not overwritten (move it, or reduce another version)")
        if all(have.get(k) == v for k, v in want.items()):
            progress(f"{name}/{target}: up to date (PCA {dim} of version {source_version})")
            allow_any_dim(model_dir / "config.pbtxt")
            return metas[target]

    basis = None
    if fit_paths is None and params is not None:
        pack = Path(params) / pack_name(name, dim, power)
        try:
            basis = packed_basis(pack, src_sha, dim, power, source_model=src_dir / "model.onnx", source_meta=src_meta)
        except PackError as exc:
            progress(f"{name}/{target}: fitting the PCA ({exc})")
    default_fit = fit_paths is None
    fit_paths = list(default_fit_paths() if fit_paths is None else fit_paths)
    if basis is not None:
        w, b, packed, matched = basis
        fitted_on, proj_var = packed.get("fitted_on"), packed.get("variance_kept")
        progress(f"{name}/{target}: PCA {dim} of version {source_version} from {provenance(pack)}, not fitted: "
                 f"version {source_version} is {matched}")
        check = embed_paths(src_dir / "model.onnx", src_meta, fit_paths[:PARITY_PHOTOS], progress)
    else:
        progress(f"{name}/{target}: PCA {dim} of version {source_version}, fitted on {len(fit_paths)} photos")
        x = embed_paths(src_dir / "model.onnx", src_meta, fit_paths, progress)
        w, b = fit_pca(x, dim, power)
        check = x[:PARITY_PHOTOS]
        fitted_on = f"{len(fit_paths)} photos" + (" (the grocery train photos)" if default_fit else " (given)")
        # The share of the descriptors' variance the kept directions hold (meaningful without whitening).
        proj_var = round(float(np.var(x @ w + b, axis=0).sum() / np.var(x, axis=0).sum()), 4) if power == 0 else None
    dst_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir / f".model.onnx.tmp{os.getpid()}"
    try:
        append_projection(src_dir / "model.onnx", tmp, w, b, src_meta.get("output_name") or "embeddings")
        got = embed_paths(tmp, src_meta, fit_paths[:PARITY_PHOTOS], progress)
        diff = float(np.abs(got - project(check, w, b)).max())
        if not diff < PARITY_TOL:
            raise RuntimeError(f"the reduced graph differs from the numpy projection by {diff:.2e}")
        os.replace(tmp, dst_dir / "model.onnx")
    finally:
        tmp.unlink(missing_ok=True)
    record = ModelRecord.from_dict(src_meta).derive(
                version=target, id=f"{src_meta.get('id') or name}-pca{dim}" + (f"w{power:g}" if power else ""),
                dim=dim, model_sha256=sha256_file(dst_dir / "model.onnx"), parity_max_abs_diff=diff,
                reduction={**want, "method": "PCA" + (" whitening" if power else "") + " in the graph (MatMul + Add + L2 "
                           "after the embeddings output)", "fitted_on": fitted_on, "variance_kept": proj_var,
                           **({"basis_from": provenance(pack), "basis_check": matched} if basis is not None else {})})
    record.write(dst_dir)
    meta = record.to_dict()
    if allow_any_dim(model_dir / "config.pbtxt"):
        progress(f"{model_dir / 'config.pbtxt'}: embeddings dims [ -1 ] (versions of different dimension)")
    progress(f"{name}/{target}: {meta['id']}, {dim}-d, parity {diff:.1e}, variance kept {meta['reduction']['variance_kept']}")
    return meta
