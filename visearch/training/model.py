"""The trainable descriptor model: a backbone cut into units, pooling, and a projection (learned whitening).

The backbone is a chain of units (stem, blocks, head conv) whose composition is
`forward_features`. Units before `train_from` are frozen; their output is what the
feature cache stores, so training runs only the top units on cached maps. The model
is `visearch.modeling.embedder.Embedder` (uint8 NHWC in, L2-normalised out) with a
projection head, so a checkpoint exports with the served model's contract unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visearch.modeling import backbones, pooling
from visearch.modeling.embedder import NORMALISATION, Embedder


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "efficientnet_lite0"
    pooling: str = "rmac"
    size: int = 320
    gem_p: float = 3.0
    rmac_levels: int = 3
    train_from: int = 15  # first trainable unit (see `units`); earlier units are frozen
    cache_at: int = 0  # units before this one are cached (0: = train_from); units cache_at..train_from-1 run frozen
    dim: int = 512  # output dimension of the projection; 0 = no projection
    whitening_init: str = "random"  # "random", "identity" (start at the off-the-shelf descriptor), "pca" (PCA
    # whitening of the training descriptors) or "pca-rotate" (PCA without scaling)
    freeze_bn: bool = True  # keep BatchNorm statistics of the trainable units at their ImageNet values

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def cut(self) -> int:
        """First unit computed at training time (the cache holds the output of the unit before)."""
        return self.cache_at or self.train_from

    @property
    def feature_size(self) -> int:
        return self.size // backbones.SPECS[self.arch].stride


class _Call(nn.Module):
    """A unit made of existing modules (not registered here: they stay owned by the backbone)."""

    def __init__(self, fn):
        super().__init__()
        self._fn = [fn]  # a list hides it from nn.Module registration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn[0](x)


def units(backbone: nn.Module) -> list[nn.Module]:
    """The backbone as a chain of units: `units[-1](...units[0](x))` == `backbone.forward_features(x)`.

    EfficientNet-Lite0: 0 = stem, 1..16 = MBConv blocks 0..15, 17 = head conv (18 units).
    MobileNetV2: the 19 entries of `features`.
    """
    if isinstance(backbone, backbones.EfficientNetLite):
        b = backbone
        return [_Call(lambda x: F.relu6(b._bn0(b._conv_stem(x)))), *b._blocks,
                _Call(lambda x: F.relu6(b._bn1(b._conv_head(x))))]
    if isinstance(backbone, backbones.MobileNetV2):
        return list(backbone.features)
    raise TypeError(f"no unit split for {type(backbone).__name__}")


def unit_modules(backbone: nn.Module, start: int) -> list[nn.Module]:
    """The parameter-owning modules of units[start:] (for optimisers and BatchNorm handling)."""
    if isinstance(backbone, backbones.EfficientNetLite):
        mods: list[nn.Module] = []
        if start <= 0:
            mods += [backbone._conv_stem, backbone._bn0]
        mods += list(backbone._blocks[max(start - 1, 0):])
        return mods + ([backbone._conv_head, backbone._bn1] if start <= len(backbone._blocks) + 1 else [])
    return list(backbone.features[start:])


def has_stride2(backbone: nn.Module, start: int) -> bool:
    """Whether a unit from `start` on downsamples (then cropping its input changes 'SAME' padding)."""
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1
               for mod in unit_modules(backbone, start) for m in mod.modules())


def n_units(arch: str) -> int:
    """The number of units `units` splits the backbone into: the stem, every MBConv block and the head
    conv for EfficientNet-Lite (18 for Lite0, 23 for Lite2, whose depth multiplier adds blocks)."""
    if arch in backbones.EfficientNetLite.COEFFS:
        return backbones.EfficientNetLite.n_blocks(arch) + 2
    return 19


class Projection(nn.Linear):
    """Linear projection after pooling; initialised as PCA whitening it is the 'learned whitening' of the descriptor."""

    def params(self) -> dict:
        return {"in": self.in_features, "out": self.out_features}


def make_model(cfg: ModelConfig) -> Embedder:
    """An Embedder (ImageNet weights loaded) with the projection head the config asks for."""
    if cfg.size % 32:
        raise ValueError(f"input size {cfg.size} must be a multiple of 32")
    if not 0 <= cfg.train_from <= n_units(cfg.arch):
        raise ValueError(f"train_from must be in [0, {n_units(cfg.arch)}] for {cfg.arch} "
                         f"({n_units(cfg.arch)}: only pooling and projection train)")
    if cfg.whitening_init not in ("random", "identity", "pca", "pca-rotate"):
        raise ValueError(f"unknown whitening_init {cfg.whitening_init!r}: random, identity, pca or pca-rotate")
    if cfg.cache_at > cfg.train_from:
        raise ValueError("cache_at must not be after train_from (cached units cannot train)")
    backbone = backbones.load_backbone(cfg.arch, cfg.size)
    fs = cfg.feature_size
    pool = pooling.make_pooling(cfg.pooling, feature_size=(fs, fs), p=cfg.gem_p, levels=cfg.rmac_levels)
    c = backbones.SPECS[cfg.arch].dim
    head = Projection(c, cfg.dim) if cfg.dim else None
    mean, std = NORMALISATION[cfg.arch]
    return Embedder(backbone, pool, mean, std, head=head)


def normalise_images(model: Embedder, images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, exactly as the exported graph does it."""
    return (images.to(torch.float32) * model.scale + model.shift).permute(0, 3, 1, 2)


def run_units(model: Embedder, x: torch.Tensor, start: int, end: int | None = None) -> torch.Tensor:
    for unit in units(model.backbone)[start:end]:
        x = unit(x)
    return x


def pool_features(model: Embedder, fmap: torch.Tensor) -> torch.Tensor:
    """Pool a last-layer map of any size (R-MAC regions recomputed when a crop changed the size).

    R-MAC goes through `fast_rmac` (same values as `pooling.rmac`, a few times faster backward);
    the exported graph keeps `pooling.RMAC`.
    """
    pool = model.pool
    if isinstance(pool, pooling.RMAC):
        h, w = int(fmap.shape[-2]), int(fmap.shape[-1])
        regions = pool.regions if pool.regions is not None and (h, w) == _regions_size(pool.regions) else \
            pooling.rmac_regions(h, w, pool.levels)
        return fast_rmac(fmap, regions, pool.eps)
    return pool(fmap)


def _regions_size(regions: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
    return max(y + h for y, _, h, _ in regions), max(x + w for _, x, _, w in regions)


def fast_rmac(x: torch.Tensor, regions: Sequence[tuple[int, int, int, int]], eps: float = 1e-6) -> torch.Tensor:
    """R-MAC with one stride-1 max-pool per region size instead of a slice and a max per region."""
    by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y, x0, rh, rw in regions:
        by_size.setdefault((rh, rw), []).append((y, x0))
    total = None
    for (rh, rw), starts in by_size.items():
        m = F.max_pool2d(x, (rh, rw), stride=1)  # [N, C, H-rh+1, W-rw+1]: the MAC of every placement
        ys = torch.tensor([y for y, _ in starts])
        xs = torch.tensor([x0 for _, x0 in starts])
        v = F.normalize(m[:, :, ys, xs], dim=1, eps=eps).sum(-1)  # [N, C]
        total = v if total is None else total + v
    assert total is not None, "R-MAC needs at least one region"
    return F.normalize(total, dim=-1, eps=eps)


def embed_from(model: Embedder, x: torch.Tensor, start: int) -> torch.Tensor:
    """L2-normalised embeddings from the output of unit `start - 1` (a cached map) or images' NCHW tensor (start 0)."""
    v = pool_features(model, run_units(model, x, start))
    if model.head is not None:
        v = model.head(v)
    return F.normalize(v, p=2.0, dim=1, eps=1e-12)


def set_trainable(model: Embedder, train_from: int, freeze_bn: bool) -> list[nn.Parameter]:
    """Freeze units before `train_from`; return the backbone parameters left trainable."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in unit_modules(model.backbone, train_from):
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    if freeze_bn:
        for m in unit_modules(model.backbone, train_from):
            for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
                for p in bn.parameters():
                    p.requires_grad_(False)
        params = [p for p in params if p.requires_grad]
    return params


def frozen_modules(backbone: nn.Module, train_from: int) -> list[nn.Module]:
    """The parameter-owning modules of units[:train_from]."""
    trainable = {id(m) for m in unit_modules(backbone, train_from)}
    return [m for m in backbone.children() if id(m) not in trainable and not isinstance(m, nn.ModuleList)] + [
        m for lst in backbone.children() if isinstance(lst, (nn.ModuleList, nn.Sequential))
        for m in lst if id(m) not in trainable]


def train_mode(model: Embedder, train_from: int, freeze_bn: bool) -> None:
    """model.train(), but frozen units stay in eval mode, and with `freeze_bn` every BatchNorm too."""
    model.train()
    for m in frozen_modules(model.backbone, train_from):
        m.eval()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


@torch.no_grad()
def init_identity(head: nn.Linear) -> None:
    """Start the projection at the identity (the first `out` coordinates): training begins from the ImageNet descriptor."""
    if head.out_features > head.in_features:
        raise ValueError("identity init needs dim <= the pooled descriptor's dimension")
    head.weight.copy_(torch.eye(head.out_features, head.in_features))
    head.bias.zero_()


@torch.no_grad()
def init_whitening(head: nn.Linear, descriptors: np.ndarray, whiten: bool = True, eps: float = 1e-6,
                   shrink: float = 0.1) -> None:
    """Set `head` to PCA (whitening) of `descriptors` [N, C]: mean removed, top-`out` directions, unit variance.

    The eigenvalues are shrunk towards their mean (`shrink`) so that directions with tiny
    variance on the training images are not blown up (Radenovic et al.'s Lw without labels).
    `whiten=False` keeps the PCA rotation only.
    """
    x = descriptors.astype(np.float64)
    mu = x.mean(0)
    cov = np.cov(x - mu, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:head.out_features]
    vals, vecs = vals[order], vecs[:, order]
    vals = (1 - shrink) * vals + shrink * vals.mean()
    w = (vecs / np.sqrt(vals + eps)).T if whiten else vecs.T  # [out, C]
    if w.shape[0] < head.out_features:  # fewer samples than dims: pad with small random rows
        rng = np.random.default_rng(0)
        pad = rng.normal(0, 1 / np.sqrt(x.shape[1]), (head.out_features - w.shape[0], x.shape[1]))
        w = np.concatenate([w, pad])
    head.weight.copy_(torch.from_numpy(w).to(head.weight.dtype))
    head.bias.copy_(torch.from_numpy(-(w @ mu)).to(head.bias.dtype))
