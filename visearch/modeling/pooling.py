"""Global pooling of a conv feature map [N, C, h, w] into a descriptor [N, C].

Functional forms plus nn.Module wrappers, after cnnimageretrieval-pytorch
(Radenovic et al.). Everything exports to ONNX opset 17 with static shapes:
R-MAC's region grid is computed in Python from the feature-map size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: per-channel spatial max."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (as a mean: identical after L2 normalisation)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean: (mean x^p)^(1/p); p=1 is SPoC, p->inf is MAC."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """Tolias et al. (ICLR 2016) R-MAC regions as (y, x, height, width) boxes on an h x w map.

    Level l has square regions of side 2*min(h,w)/(l+1) on a grid of l (plus the
    extra count the long side needs for ~40% overlap) positions per axis.
    """
    side = min(h, w)
    extra_h = extra_w = 0
    if h != w:
        # Number of extra steps along the long side that gives the overlap closest to 40%.
        best, steps = None, 0
        for n in range(1, 7):
            b = (max(h, w) - side) / n
            err = abs((side * side - side * b) / (side * side) - overlap)
            if best is None or err < best:
                best, steps = err, n
        extra_h, extra_w = (steps, 0) if h > w else (0, steps)
    boxes: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl < 1:
            continue
        ys = _centres(h, wl, level + extra_h)
        xs = _centres(w, wl, level + extra_w)
        boxes += [(y, x, wl, wl) for y in ys for x in xs]
    return boxes


def _centres(size: int, wl: int, n: int) -> list[int]:
    """n evenly spaced region starts covering [0, size) with regions of side wl."""
    if n == 1:
        return [0] if wl >= size else [(size - wl) // 2]
    step = (size - wl) / (n - 1)
    return [min(int(math.floor(i * step)), size - wl) for i in range(n)]


def rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6,
         regions: list[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """Regional MAC: MAC of each region, each L2-normalised, summed, then L2-normalised."""
    if regions is None:
        regions = rmac_regions(int(x.shape[-2]), int(x.shape[-1]), levels)
    total = None
    for y, x0, rh, rw in regions:
        v = F.normalize(mac(x[:, :, y:y + rh, x0:x0 + rw]), dim=-1, eps=eps)
        total = v if total is None else total + v
    assert total is not None, "R-MAC needs at least one region"
    return F.normalize(total, dim=-1, eps=eps)


class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)

    def params(self) -> dict:
        return {}


class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)

    def params(self) -> dict:
        return {}


class GeM(nn.Module):
    """GeM with a learnable exponent p (fixed at its initial value when not fine-tuned)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def params(self) -> dict:
        return {"p": round(float(self.p.detach()), 6), "eps": self.eps}


class RMAC(nn.Module):
    """R-MAC; pass `feature_size` (h, w) to freeze the region grid for export."""

    def __init__(self, levels: int = 3, eps: float = 1e-6, feature_size: tuple[int, int] | None = None):
        super().__init__()
        self.levels = levels
        self.eps = eps
        self.regions = rmac_regions(*feature_size, levels) if feature_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels, self.eps, self.regions)

    def params(self) -> dict:
        return {"levels": self.levels, "n_regions": len(self.regions) if self.regions else None}


POOLINGS = ("gem", "rmac", "mac", "spoc")


def make_pooling(name: str, feature_size: tuple[int, int] | None = None, p: float = 3.0, levels: int = 3) -> nn.Module:
    """A pooling module by name: gem, rmac, mac, spoc."""
    if name == "gem":
        return GeM(p)
    if name == "rmac":
        return RMAC(levels, feature_size=feature_size)
    if name == "mac":
        return MAC()
    if name == "spoc":
        return SPoC()
    raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")
