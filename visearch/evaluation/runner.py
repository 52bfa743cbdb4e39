"""Measure descriptor methods (and ONNX models) on protocols: select on a train hold-out, fit on train, score.

For a method with learned parts (PCA, whitening, codebooks):
  1. hyper-parameters (its grid, and whitening dim/power) are chosen by mAP on the
     selection protocol (TH-CD by default: a hold-out of TRAIN photos of products
     28..43; legal for P1, P3 and CD alike), with the learned parts fitted on that
     protocol's own database;
  2. for each group of reported protocols with the same `fit` set (P1 and P3: all
     train photos; CD: train photos minus products 44..58) the method is refitted
     with the chosen hyper-parameters on that set, and scored.
Methods without learned parts are scored once on every protocol.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import harness
from .protocols import Protocol

Progress = Callable[[str], None]
N_EXAMPLES = 6


@dataclass
class Row:
    """One evaluated model: a method on a backbone, or an ONNX model."""

    name: str  # e.g. "rmac+w" or an ONNX model id
    backbone: str  # "efficientnet_lite0@320", "dense SIFT", ...
    results: dict[str, dict] = field(default_factory=dict)  # protocol -> metrics
    curves: dict[str, list[float]] = field(default_factory=dict)  # protocol -> mean interpolated precision
    examples: dict[str, list[tuple[int, list[int]]]] = field(default_factory=dict)  # protocol -> [(query, top5)]
    dim: int = 0
    ms_per_image: float | None = None
    ms_note: str = ""
    hp: dict = field(default_factory=dict)
    selection: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)  # parity / file size when exported
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "backbone": self.backbone, "dim": self.dim, "ms_per_image": self.ms_per_image,
                "ms_note": self.ms_note, "hp": self.hp, "params": self.params, "onnx": self.onnx,
                "selection": self.selection, "results": self.results, "seconds": round(self.seconds, 1)}


def example_queries(protocol: Protocol, n: int = N_EXAMPLES) -> list[int]:
    """Evenly spread query indexes (the same for every row, so grids compare)."""
    m = len(protocol.queries)
    return sorted({int(i * m / n) for i in range(min(n, m))})


def score(row: Row, protocols: dict[str, Protocol], emb: dict[Path, np.ndarray]) -> None:
    """Fill `row` with metrics, PR curves and example rankings of `protocols` from descriptors `emb`."""
    for name, p in protocols.items():
        q, db = harness.protocol_matrices(p, emb)
        q, db = harness.l2_normalize(q), harness.l2_normalize(db)
        row.results[name] = harness.evaluate_embeddings(p, q, db)
        row.curves[name] = [round(float(v), 5) for v in harness.pr_curve(p, q, db)[1]]
        idx = example_queries(p)
        order, _ = harness.rank(q[idx], db, 5)
        row.examples[name] = [(i, o.tolist()) for i, o in zip(idx, order, strict=True)]
        row.dim = int(q.shape[1])


# --------------------------------------------------------------------------- torch methods on cached maps


class BaseMemo:
    """Descriptors before whitening by image path, for methods whose base learns nothing (pooling + whitening):
    computed once per image, reused by the selection and every fit set."""

    def __init__(self, store, head):
        self.store, self.head, self.vecs = store, head, {}

    def __call__(self, paths: list[Path]) -> np.ndarray:
        from visearch.modeling.methods import describe

        missing = list(dict.fromkeys(p for p in paths if p not in self.vecs))
        if missing:
            self.vecs.update(zip(missing, describe(self.head.base, self.store.maps, self.head.taps, missing), strict=True))
        return np.stack([self.vecs[p] for p in paths])


def _select(name: str, store, sel: Protocol, progress: Progress, memo: BaseMemo | None = None
            ) -> tuple[dict, list[dict]]:
    """Choose the method's hyper-parameters by mAP on `sel`, learned parts fitted on sel.fit."""
    import torch

    from visearch.modeling.methods import METHODS, FitContext, base_grid, describe, fit_whitening, whiten_grid

    spec = METHODS[name]
    ctx = FitContext(store.arch, store.size, store.shapes, store.maps, [p.path for p in sel.fit])
    qp, dbp = [p.path for p in sel.queries], [p.path for p in sel.database]
    trials: list[dict] = []
    for bp in base_grid(spec):
        head = spec.fit(ctx, dict(bp))
        base = memo if memo is not None else (lambda paths, h=head: describe(h.base, store.maps, h.taps, paths))
        if not spec.whiten:
            q = describe(head, store.maps, head.taps, qp)
            db = describe(head, store.maps, head.taps, dbp)
            m = harness.evaluate_embeddings(sel, q, db)
            trials.append({**bp, "mAP": round(m["mAP"], 4), "recall@1": round(m["recall@1"], 4)})
            continue
        Xq, Xdb = base(qp), base(dbp)
        Xfit = Xdb if [p.path for p in sel.fit] == dbp else base(ctx.fit_paths)
        for wp in whiten_grid(int(head.params["base_dim"]), len(Xfit)):
            w = fit_whitening(Xfit, wp["wdim"], wp["wpower"], ctx.cache)
            with torch.no_grad():
                q, db = w(torch.from_numpy(Xq)).numpy(), w(torch.from_numpy(Xdb)).numpy()
            m = harness.evaluate_embeddings(sel, q, db)
            trials.append({**bp, **wp, "mAP": round(m["mAP"], 4), "recall@1": round(m["recall@1"], 4)})
    best = max(trials, key=lambda t: t["mAP"])  # first best on ties
    hp = {k: v for k, v in best.items() if k not in ("mAP", "recall@1")}
    progress(f"    {name}: selected {hp} on {sel.name} (mAP {best['mAP']:.3f}, {len(trials)} candidates)")
    return hp, trials


def run_method(name: str, store, protocols: dict[str, Protocol], select_on: Protocol | None = None,
               progress: Progress = harness.stderr_progress, export_dir: Path | None = None,
               sample_batch: np.ndarray | None = None) -> Row:
    """Select (if `select_on` and the method has choices), fit per fit set, score; optionally export + time."""
    import torch

    from visearch.modeling.methods import METHODS, FitContext, describe, fit_method

    t0 = time.perf_counter()
    spec = METHODS[name]
    row = Row(name, f"{store.arch}@{store.size}")
    hp: dict = {}
    memo = None
    if spec.fixed_base:
        memo = BaseMemo(store, spec.fit(FitContext(store.arch, store.size, store.shapes, store.maps, []), {}))
    if select_on is not None and spec.learned and (spec.grid or spec.whiten):
        hp, row.selection = _select(name, store, select_on, progress, memo)
    row.hp = hp
    groups: dict[str, list[str]] = {}
    for n, p in protocols.items():
        groups.setdefault(p.fit_key if spec.learned else "-", []).append(n)
    head = None
    for names in groups.values():
        fit_paths = [ph.path for ph in protocols[names[0]].fit]
        ctx = FitContext(store.arch, store.size, store.shapes, store.maps, fit_paths)
        head = fit_method(name, ctx, hp, base_fn=memo)
        sub = {n: protocols[n] for n in names}

        def embed(paths, head=head):
            with torch.no_grad():
                if memo is not None and head.whiten is not None:
                    return head.whiten(torch.from_numpy(memo(paths))).numpy()
                return describe(head, store.maps, head.taps, paths)

        score(row, sub, harness.embed_all(embed, harness.distinct_paths(sub)))
        row.params.setdefault("fit", {})[",".join(names)] = len(fit_paths)
    assert head is not None
    row.params.update({k: v for k, v in head.params.items() if k != "fit"})
    if export_dir is not None and spec.onnx:
        _export(row, store, head, export_dir, sample_batch)
    row.seconds = time.perf_counter() - t0
    return row


def _export(row: Row, store, head, export_dir: Path, batch: np.ndarray | None) -> None:
    """Export the (last fitted) model to ONNX, check parity with torch, time it in ONNX Runtime."""
    from visearch.modeling.methods import export_method_onnx, make_method_embedder, onnx_ms_per_image, onnx_parity

    export_dir.mkdir(parents=True, exist_ok=True)
    model = make_method_embedder(store.arch, store.size, head, backbone=store.backbone)
    path = export_dir / f"{store.arch}-{store.size}-{row.name.replace('+', '_')}.onnx"
    export_method_onnx(model, store.size, path, doc=f"visearch {row.name} on {store.arch}@{store.size}")
    if batch is not None:
        row.onnx["parity_max_abs_diff"] = onnx_parity(model, path, batch[:4])
        row.ms_per_image = round(onnx_ms_per_image(path, batch), 1)
        row.ms_note = f"ONNX Runtime, 1 thread, batch {len(batch)}"
    row.onnx["file"] = str(path)
    row.onnx["mb"] = round(path.stat().st_size / 1e6, 1)


# --------------------------------------------------------------------------- ONNX models


def onnx_model_path(target: Path) -> tuple[Path, dict]:
    """The model.onnx (and its meta.json record, or {}) of a file, a version dir, or a model repository."""
    from visearch.models import ModelRecord

    target = Path(target)
    if target.is_file():
        path = target
    elif (target / "model.onnx").is_file():
        path = target / "model.onnx"
    else:
        found = sorted(target.glob("*/[0-9]*/model.onnx"), key=lambda p: (p.parent.parent.name != "embedder",
                                                                            -int(p.parent.name)))
        found = found or sorted(target.glob("[0-9]*/model.onnx"), key=lambda p: -int(p.parent.name))
        if not found:
            raise FileNotFoundError(f"no model.onnx in {target} (nor in <name>/<version>/ below it)")
        path = found[0]
    meta_path = path.parent / "meta.json"
    meta = ModelRecord.read(meta_path).to_dict() if meta_path.is_file() else {}
    return path, meta


def run_onnx(target: Path, protocols: dict[str, Protocol], cache: Path | None = None, threads: int = 1,
             batch: int = 32, progress: Progress = harness.stderr_progress) -> Row:
    """Embed through ONNX Runtime exactly as served (decode_image + to_model_input) and score."""
    from visearch.offline import OfflineEmbedder

    t0 = time.perf_counter()
    path, meta = onnx_model_path(target)
    model = OfflineEmbedder(path, meta.get("input_size"), threads)
    size = model.size

    def embed(paths: list[Path]) -> np.ndarray:
        return model.embed_paths(paths, batch, progress=lambda done, total: progress(f"    {model.images}/{total} images"))

    from visearch.checksum import sha256_file

    sha = meta.get("model_sha256") or sha256_file(path)
    name = meta.get("id") or path.stem
    from visearch.imaging import PREPROCESSING

    tag = hashlib.sha256(f"{sha}:{PREPROCESSING}".encode()).hexdigest()[:12]  # the model and how its inputs are made
    cfile = (Path(cache) / "emb" / f"{name}-{tag}.npz") if cache is not None else None
    row = Row(name, meta.get("architecture", "onnx") + (f"@{size}" if meta else ""))
    row.params = {"model": str(path), "input_size": size, **{k: meta[k] for k in ("pooling", "pooling_params") if k in meta}}
    score(row, protocols, harness.embed_all(embed, harness.distinct_paths(protocols), cfile, progress))
    if model.images:
        row.ms_per_image = round(model.ms_per_image, 1)
        row.ms_note = f"ONNX Runtime, {threads} thread(s), batch {batch}"
    row.seconds = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- classic dense SIFT + VLAD


def run_sift(protocols: dict[str, Protocol], select_on: Protocol | None = None, cache: Path | None = None,
             progress: Progress = harness.stderr_progress, k: int = 64) -> Row:
    """The classic baseline: dense SIFT + k-means + VLAD + PCA-whitening (selected on `select_on`)."""
    from visearch.classic import DenseSIFT, SiftBank, SiftVLAD
    from visearch.modeling.methods import whiten_grid

    t0 = time.perf_counter()
    dsift = DenseSIFT()
    bank = SiftBank(dsift, cache, progress)
    every = harness.distinct_paths(protocols)
    sel_paths = harness.distinct_paths({"s": select_on}) if select_on is not None else []
    bank.prepare(list(dict.fromkeys([*every, *sel_paths, *(p.path for pr in protocols.values() for p in pr.fit)])))
    row = Row("sift-vlad", f"dense SIFT@{dsift.side}")
    hp = {"wdim": 512, "wpower": 0.5}
    if select_on is not None:
        fit_paths = [p.path for p in select_on.fit]
        model = SiftVLAD(k).fit_codebook(bank.get(fit_paths))
        Vfit = model.vlads(bank.get(fit_paths))
        Vq = model.vlads(bank.get([p.path for p in select_on.queries]))
        Vdb = Vfit if fit_paths == [p.path for p in select_on.database] else model.vlads(
            bank.get([p.path for p in select_on.database]))
        pca_cache: dict = {}
        for wp in whiten_grid(Vfit.shape[1], len(Vfit)):
            model.wdim, model.wpower = wp["wdim"], wp["wpower"]
            model.fit_whitening(Vfit, pca_cache)
            m = harness.evaluate_embeddings(select_on, model.whiten(Vq), model.whiten(Vdb))
            row.selection.append({**wp, "mAP": round(m["mAP"], 4), "recall@1": round(m["recall@1"], 4)})
        best = max(row.selection, key=lambda t: t["mAP"])
        hp = {"wdim": best["wdim"], "wpower": best["wpower"]}
        progress(f"    sift-vlad: selected {hp} on {select_on.name} (mAP {best['mAP']:.3f})")
    row.hp = hp
    groups: dict[str, list[str]] = {}
    for n, p in protocols.items():
        groups.setdefault(p.fit_key, []).append(n)
    for names in groups.values():
        fit_paths = [ph.path for ph in protocols[names[0]].fit]
        model = SiftVLAD(k, hp["wdim"], hp["wpower"]).fit(bank.get(fit_paths))
        sub = {n: protocols[n] for n in names}
        score(row, sub, harness.embed_all(lambda paths, m=model: m.embed(bank.get(paths)), harness.distinct_paths(sub)))
        row.params.setdefault("fit", {})[",".join(names)] = len(fit_paths)
    row.params.update(k=k, side=dsift.side, step=dsift.step, patch=dsift.patch, points=dsift.n, descriptor="RootSIFT")
    # time per image: decode + dense SIFT + VLAD + whitening, one thread
    sample = every[:16]
    t = time.perf_counter()
    model.embed(np.stack([dsift.describe(p) for p in sample]))
    row.ms_per_image = round(1000 * (time.perf_counter() - t) / len(sample), 1)
    row.ms_note = "Python + OpenCV, 1 thread, incl. decode (not ONNX)"
    row.seconds = time.perf_counter() - t0
    return row
