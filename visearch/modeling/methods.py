"""Descriptor methods as exportable models: backbone stage taps -> aggregation head -> (learned whitening) -> L2.

A method is fitted on TRAIN feature maps only (PCA, whitening, k-means
codebooks, level weights), then becomes one torch module

    MethodEmbedder: uint8 NHWC [N, S, S, 3] -> normalise -> backbone taps -> Head -> L2 [N, D]

that exports to ONNX (opset 17, dynamic batch axis, tensor names `images` /
`embeddings`) with the input normalisation, every learned projection and the
final L2 inside the graph: the same contract as the served embedder
(docs/MODELS.md). `Head` alone maps cached feature maps to descriptors, which
is how `visearch.evaluation` measures every method from one backbone pass.

    ctx = FitContext(arch, size, shapes, maps, fit_paths)     # maps: cached feature maps by path
    head = fit_method("spoc", ctx, {"wdim": 256, "wpower": 0.5})
    model = make_method_embedder(arch, size, head)
    export_method_onnx(model, size, Path("model.onnx"))
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visearch.models.contract import INPUT_NAME, OPSET, OUTPUT_NAME

from . import backbones, pooling
from .aggregation import (
    MOPCNN,
    VLAD,
    ColumnPCA,
    MultiLevelFusion,
    NetVLAD,
    SecondOrderFusion,
    kmeans,
    netvlad_alpha,
)
from .embedder import NORMALISATION
from .whitening import Whiten, pca, whitening_from_pca

# The stage outputs the methods read: s5 (stride 16, 112/96/120 channels), s7 (stride 32,
# 320/320/352) and head (the last 1x1 conv, 1280) of EfficientNet-Lite / MobileNetV2.
STORE_TAPS = ("s5", "s7", "head")


# --------------------------------------------------------------------------- backbone taps


def _stage_ends(blocks: Sequence[nn.Module], out_channels: Callable[[nn.Module], int]) -> dict[int, str]:
    """Block index -> 's<k>' for the last block of each stage (a stage = a run of equal output channels)."""
    ends: dict[int, str] = {}
    stage = 0
    for i, b in enumerate(blocks):
        if i == len(blocks) - 1 or out_channels(blocks[i + 1]) != out_channels(b):
            stage += 1
            ends[i] = f"s{stage}"
    return ends


class TapBackbone(nn.Module):
    """A backbone that returns the maps of the named stages (`s1`..`s7`, `head`) in `taps` order."""

    def __init__(self, backbone: nn.Module, taps: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.taps = tuple(taps)
        if isinstance(backbone, backbones.EfficientNetLite):
            self._ends = _stage_ends(list(backbone._blocks), lambda b: b._bn2.num_features)
        elif isinstance(backbone, backbones.MobileNetV2):
            blocks = list(backbone.features)[1:-1]
            self._ends = {i + 1: n for i, n in _stage_ends(blocks, lambda b: b.conv[-1].num_features).items()}
        else:
            raise TypeError(f"no stage taps for {type(backbone).__name__}")
        known = set(self._ends.values()) | {"head"}
        bad = [t for t in self.taps if t not in known]
        if bad:
            raise ValueError(f"unknown tap(s) {bad}; this backbone has {sorted(known)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        want, out = set(self.taps), {}
        b = self.backbone
        if isinstance(b, backbones.EfficientNetLite):
            x = F.relu6(b._bn0(b._conv_stem(x)))
            for i, block in enumerate(b._blocks):
                x = block(x)
                if self._ends.get(i) in want:
                    out[self._ends[i]] = x
                    if len(out) == len(want):
                        break
            else:
                if "head" in want:
                    out["head"] = F.relu6(b._bn1(b._conv_head(x)))
        else:
            layers = list(b.features)
            for i, layer in enumerate(layers):
                x = layer(x)
                name = "head" if i == len(layers) - 1 else self._ends.get(i)
                if name in want:
                    out[name] = x
                    if len(out) == len(want):
                        break
        return tuple(out[t] for t in self.taps)


def tap_shapes(arch: str, size: int, taps: Sequence[str] = STORE_TAPS, backbone: nn.Module | None = None
               ) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) of each tap for square inputs of `size`."""
    net = TapBackbone(backbone if backbone is not None else backbones.load_backbone(arch, size), taps)
    with torch.no_grad():
        maps = net(torch.zeros(1, 3, size, size))
    return {t: tuple(int(d) for d in m.shape[1:]) for t, m in zip(taps, maps, strict=True)}


# --------------------------------------------------------------------------- heads and the embedder


class Head(nn.Module):
    """Maps the feature maps of `taps` to an L2-normalised descriptor: L2(body(*maps)), then `whiten` if any."""

    def __init__(self, method: str, taps: Sequence[str], body: nn.Module, whiten: Whiten | None = None,
                 params: dict | None = None):
        super().__init__()
        self.method = method
        self.taps = tuple(taps)
        self.body = body
        self.whiten = whiten
        self.params = dict(params or {})

    def base(self, *maps: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(*maps), dim=-1)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        v = self.base(*maps)
        return self.whiten(v) if self.whiten is not None else v

    @property
    def dim(self) -> int:
        if self.whiten is not None:
            return self.whiten.linear.out_features
        return int(self.params["base_dim"])


class MethodEmbedder(nn.Module):
    """uint8 NHWC RGB [N,S,S,3] -> L2-normalised float32 [N,D]; normalisation, head and whitening in the graph."""

    def __init__(self, backbone: nn.Module, head: Head, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.taps = TapBackbone(backbone, head.taps)
        self.head = head
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(*self.taps(self.normalise(images))), p=2.0, dim=1, eps=1e-12)


def make_method_embedder(arch: str, size: int, head: Head, backbone: nn.Module | None = None) -> MethodEmbedder:
    mean, std = NORMALISATION[arch]
    bb = backbone if backbone is not None else backbones.load_backbone(arch, size)
    return MethodEmbedder(bb, head, mean, std).eval()


def export_method_onnx(model: nn.Module, size: int, path: Path, doc: str = "") -> None:
    """Export with the TorchScript exporter (opset 17, dynamic batch), as the served embedder is."""
    import onnx

    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    if doc:
        proto.doc_string = doc
        onnx.save(proto, str(path))


def onnx_parity(model: nn.Module, path: Path, batch: np.ndarray) -> float:
    """max |torch - onnxruntime| on `batch` (uint8 NHWC), run whole and one image at a time."""
    from visearch.ortsession import ort_session

    sess = ort_session(path, threads=None)
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    one = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: batch[i:i + 1]})[0] for i in range(len(batch))])
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output {got.shape}, torch {ref.shape}")
    return float(max(np.abs(got - ref).max(), np.abs(one - ref).max()))


def onnx_ms_per_image(path: Path, batch: np.ndarray, threads: int = 1, repeats: int = 2) -> float:
    """ONNX Runtime CPU time per image (ms), `threads` intra-op threads, best of `repeats` after a warm-up."""
    from visearch.ortsession import ort_session

    sess = ort_session(path, threads)
    sess.run([OUTPUT_NAME], {INPUT_NAME: batch[:2]})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: batch})
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(batch)


# --------------------------------------------------------------------------- fitting

MapsFn = Callable[[Sequence[str], Sequence[Path]], Iterator[tuple[torch.Tensor, ...]]]


@dataclass
class FitContext:
    """What a method may learn from: the feature maps of the TRAIN photos `fit_paths`, nothing else."""

    arch: str
    size: int
    shapes: dict[str, tuple[int, int, int]]
    maps: MapsFn  # (taps, paths) -> chunks of maps of those paths, in order
    fit_paths: list[Path]
    seed: int = 0
    sample_images: int = 600  # images whose local descriptors feed PCA / k-means
    cache: dict = field(default_factory=dict)  # reused between grid points of one selection

    def sample_paths(self) -> list[Path]:
        if len(self.fit_paths) <= self.sample_images:
            return list(self.fit_paths)
        idx = np.random.default_rng(self.seed).choice(len(self.fit_paths), self.sample_images, replace=False)
        return [self.fit_paths[i] for i in sorted(idx)]


@torch.no_grad()
def describe(fn: Callable[..., torch.Tensor], maps: MapsFn, taps: Sequence[str], paths: Sequence[Path]) -> np.ndarray:
    """Apply `fn(*maps)` to the maps of `paths` chunk by chunk -> float32 [n, D]."""
    out = [fn(*chunk).float().numpy() for chunk in maps(taps, paths)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _rank_dim(want: int, n: int, d: int) -> int:
    """A PCA output dim the data supports (tiny smoke fit sets have rank < want)."""
    return max(1, min(want, n - 1, d))


def _pca_linear(X: np.ndarray, dim: int) -> Whiten:
    """Plain PCA projection (power 0) to dim, as a normalising Linear."""
    mean, eig, comps = pca(X)
    m, P = whitening_from_pca(mean, eig, comps, max(1, min(dim, len(eig))), power=0.0)
    return Whiten.from_numpy(m, P, power=0.0)


def _local_columns(ctx: FitContext, tap: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   max_cols: int = 150_000) -> np.ndarray:
    """Local descriptors (map columns, or `fn(map)` -> [N, D, M]) of the sample images, subsampled."""
    rng = np.random.default_rng(ctx.seed + 1)
    paths = ctx.sample_paths()
    per = max(1, max_cols // max(1, len(paths)))
    out = []
    with torch.no_grad():
        for (x,) in ctx.maps((tap,), paths):
            cols = (fn(x) if fn else x.flatten(2)).transpose(1, 2)  # [N, M, D]
            for c in cols.numpy():
                out.append(c if len(c) <= per else c[rng.choice(len(c), per, replace=False)])
    return np.concatenate(out).astype(np.float32)


def _fit_pooled(name: str) -> Callable[[FitContext, dict], Head]:
    def fit(ctx: FitContext, hp: dict) -> Head:
        c, h, w = ctx.shapes["head"]
        body = pooling.make_pooling(name, feature_size=(h, w))
        return Head(name, ("head",), body, params={"base_dim": c, **body.params()})
    return fit


ALISC_TAPS = ("s5", "s7", "head")


def _fit_alisc(ctx: FitContext, hp: dict) -> Head:
    """Concatenation init; level weights = 1 / mean norm of each level's pooled map on the sample."""
    shapes = [ctx.shapes[t] for t in ALISC_TAPS]
    body = MultiLevelFusion([s[0] for s in shapes], [s[1:] for s in shapes])
    norms = np.zeros(len(shapes))
    n = 0
    with torch.no_grad():
        for chunk in ctx.maps(ALISC_TAPS, ctx.sample_paths()):
            for i, (x, k) in enumerate(zip(chunk, body.kernels, strict=True)):
                norms[i] += float(body._pool(x, k).mean((2, 3)).norm(dim=1).sum())
            n += len(chunk[0])
        body.level_weights.copy_(torch.tensor(n / np.maximum(norms, 1e-12), dtype=torch.float32))
    return Head("alisc", ALISC_TAPS, body, params={"base_dim": body.out_dim, "taps": list(ALISC_TAPS),
                                                  "init": "concat", "level_weights": body.level_weights.tolist()})


def _fit_second_order(ctx: FitContext, hp: dict) -> Head:
    c, _, _ = ctx.shapes["head"]
    r, out = int(hp.get("reduce_dim", 64)), int(hp.get("out_dim", 512))
    cols = _local_columns(ctx, "head")
    red = _pca_linear(cols, r)
    r = red.linear.out_features
    body = SecondOrderFusion(c, r, out)
    with torch.no_grad():
        body.reduce.weight.copy_(red.linear.weight[:, :, None, None])
        body.reduce.bias.copy_(red.linear.bias)
    B = describe(body.bilinear, ctx.maps, ("head",), ctx.fit_paths)
    proj = _pca_linear(B, out)
    body.project = proj.linear  # Linear(bilinear_dim, out) with the PCA mean in its bias
    return Head("fo-so", ("head",), body, params={"base_dim": c + proj.linear.out_features, "reduce_dim": r,
                                                  "second_dim": proj.linear.out_features, "gem_p": 3.0})


def _fit_mop(ctx: FitContext, hp: dict) -> Head:
    c, h, w = ctx.shapes["head"]
    local_dim, k, level_dim = int(hp.get("local_dim", 128)), int(hp.get("k", 32)), int(hp.get("level_dim", 512))
    n = len(ctx.fit_paths)
    body = MOPCNN(c, (h, w), local_dim=_rank_dim(local_dim, 10**9, c), k=k, level_dim=_rank_dim(level_dim, n, c))
    with torch.no_grad():
        G = describe(body.global_feature, ctx.maps, ("head",), ctx.fit_paths)
        body.global_proj = _pca_linear(G, level_dim)
        for lvl in range(len(body.regions)):
            R = _local_columns(ctx, "head", lambda x, lvl=lvl: F.normalize(body.regions[lvl](x), dim=1))
            loc = _pca_linear(R, local_dim)
            body.local[lvl] = loc.linear
            L = _local_columns(ctx, "head", lambda x, lvl=lvl: body.local_features(x, lvl))
            body.vlads[lvl] = VLAD(kmeans(L, min(k, len(L)), seed=ctx.seed))
            V = describe(lambda x, lvl=lvl: body.vlads[lvl](body.local_features(x, lvl)), ctx.maps, ("head",),
                         ctx.fit_paths)
            body.level_proj[lvl] = _pca_linear(V, level_dim)
    dim = body.global_proj.linear.out_features + sum(p.linear.out_features for p in body.level_proj)
    return Head("mop-cnn", ("head",), body, params={
        "base_dim": dim, "local_dim": local_dim, "k": k, "level_dim": level_dim,
        "windows": [(r.window, r.n_regions) for r in body.regions], "approximation": "feature-map windows"})


def _fit_local_vlad(soft: bool) -> Callable[[FitContext, dict], Head]:
    def fit(ctx: FitContext, hp: dict) -> Head:
        tap, local_dim, k = hp.get("tap", "head"), int(hp.get("local_dim", 128)), int(hp.get("k", 64))
        key = ("local-vlad", tap, local_dim, k)
        if key not in ctx.cache:  # PCA + codebook, shared by the hard and soft variants
            cols = _local_columns(ctx, tap, lambda x: F.normalize(x, dim=1).flatten(2))
            mean, eig, comps = pca(cols)
            m, P = whitening_from_pca(mean, eig, comps, max(1, min(local_dim, len(eig))), power=0.0)
            local = ColumnPCA.from_whitening(m, P)
            with torch.no_grad():
                L = local(torch.from_numpy(cols.T[None, :, :, None]))[0, :, :, 0].T.numpy()
            centres = kmeans(L, k, seed=ctx.seed)
            ctx.cache[key] = (m, P, centres, netvlad_alpha(L[:50_000], centres))
        m, P, centres, alpha = ctx.cache[key]
        local = ColumnPCA.from_whitening(m, P)
        agg = NetVLAD.from_centres(centres, alpha) if soft else VLAD(centres)
        name = "netvlad" if soft else "conv-vlad"
        params = {"base_dim": k * P.shape[0], "tap": tap, "local_dim": int(P.shape[0]), "k": k}
        if soft:
            params["alpha"] = round(alpha, 3)
        return Head(name, (tap,), nn.Sequential(local, agg), params=params)
    return fit


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    fit: Callable[[FitContext, dict], Head]
    grid: dict[str, tuple] = field(default_factory=dict)  # base hyper-parameters, chosen on the train holdout
    whiten: bool = False  # append a PCA-whitening whose (wdim, wpower) are chosen on the train holdout
    learned: bool = True  # fits anything on train (the row then depends on the fit set)
    onnx: bool = True
    fixed_base: bool = False  # the part before the whitening learns nothing: its descriptors can be memoised


# The rows of docs/RESULTS.md were selected on this grid; most picked its corner (128, 0.25).
WHITEN_GRID = {"wdim": (128, 256, 512, 1024), "wpower": (0.5, 0.25)}
VLAD_TAPS = ("s5", "s7", "head")

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("mac", "MAC: per-channel max", _fit_pooled("mac"), learned=False),
    MethodSpec("spoc", "SPoC: sum (mean) pooling, no whitening", _fit_pooled("spoc"), learned=False),
    MethodSpec("gem", "GeM p=3", _fit_pooled("gem"), learned=False),
    MethodSpec("rmac", "R-MAC, 3 levels, no whitening", _fit_pooled("rmac"), learned=False),
    MethodSpec("spoc+w", "SPoC + PCA-whitening (Babenko & Lempitsky 2015)", _fit_pooled("spoc"), whiten=True,
               fixed_base=True),
    MethodSpec("mac+w", "MAC + PCA-whitening", _fit_pooled("mac"), whiten=True,
               fixed_base=True),
    MethodSpec("gem+w", "GeM p=3 + PCA-whitening", _fit_pooled("gem"), whiten=True,
               fixed_base=True),
    MethodSpec("rmac+w", "R-MAC + PCA-whitening", _fit_pooled("rmac"), whiten=True,
               fixed_base=True),
    MethodSpec("alisc", "multi-level fusion s5+s7+head (ALISC), concatenation init, sum pooling", _fit_alisc),
    MethodSpec("alisc+w", "multi-level fusion (ALISC) + PCA-whitening", _fit_alisc, whiten=True),
    MethodSpec("fo-so", "GeM first order + bilinear (r=64) second order PCA'd to 512", _fit_second_order),
    MethodSpec("fo-so+w", "first + second order + PCA-whitening", _fit_second_order, whiten=True),
    MethodSpec("mop-cnn", "MOP-CNN: global MAC + VLAD(k=32) of 5x5 / 7x7 window MACs, PCA 512 each", _fit_mop),
    MethodSpec("conv-vlad", "conv columns (PCA 128) + VLAD k=64 + PCA-whitening (Ng et al. 2015)",
               _fit_local_vlad(False), grid={"tap": VLAD_TAPS}, whiten=True),
    MethodSpec("netvlad", "NetVLAD k=64 on conv columns (PCA 128), k-means init, + PCA-whitening",
               _fit_local_vlad(True), grid={"tap": VLAD_TAPS}, whiten=True),
)}


def whiten_grid(base_dim: int, n_fit: int) -> list[dict]:
    dims = [d for d in WHITEN_GRID["wdim"] if d <= min(base_dim, n_fit - 1)] or [max(1, min(base_dim, n_fit - 1))]
    return [{"wdim": d, "wpower": p} for d in dims for p in WHITEN_GRID["wpower"]]


def base_grid(spec: MethodSpec) -> list[dict]:
    points: list[dict] = [{}]
    for k, values in spec.grid.items():
        points = [{**p, k: v} for p in points for v in values]
    return points


def fit_method(name: str, ctx: FitContext, hp: dict | None = None,
               base_fn: Callable[[list[Path]], np.ndarray] | None = None) -> Head:
    """Fit method `name` with hyper-parameters `hp` (grid keys; wdim/wpower for whitened methods) on ctx.

    `base_fn(paths)`, if given, returns the descriptors before whitening (memoised by the caller).
    """
    spec = METHODS[name]
    hp = dict(hp or {})
    head = spec.fit(ctx, hp)
    head.method = name
    if spec.whiten:
        X = base_fn(ctx.fit_paths) if base_fn else describe(head.base, ctx.maps, head.taps, ctx.fit_paths)
        head.whiten = fit_whitening(X, hp.get("wdim", 256), hp.get("wpower", 0.5), ctx.cache)
        head.params.update(wdim=head.whiten.linear.out_features, wpower=hp.get("wpower", 0.5))
    head.params.update({k: v for k, v in hp.items() if k not in head.params})
    return head.eval()


def fit_whitening(X: np.ndarray, dim: int, power: float, cache: dict | None = None) -> Whiten:
    """PCA-whitening of X to `dim` (clamped to the data's rank); the PCA is cached by X's identity."""
    key = ("pca", X.shape, float(X[:4].sum()), float(X[-4:].sum()))
    if cache is not None and key in cache:
        mean, eig, comps = cache[key]
    else:
        mean, eig, comps = pca(X)
        if cache is not None:
            cache[key] = (mean, eig, comps)
    m, P = whitening_from_pca(mean, eig, comps, max(1, min(int(dim), len(eig))), power=power)
    return Whiten.from_numpy(m, P, power=power)
