"""Aggregation of conv feature maps beyond plain pooling: VLAD, NetVLAD, second-order and multi-level fusion, MOP-CNN.

Functional forms plus nn.Modules (the style of `pooling.py`, after
cnnimageretrieval-pytorch). Every module maps feature maps [N, C, h, w] to a
descriptor and exports to ONNX opset 17 with static shapes (region grids and
index sets are computed in Python from the feature-map size). Their learned
parts (PCA projections, k-means codebooks) are fitted on TRAIN descriptors by
`visearch.modeling.methods`; every one is an ordinary parameter, so the
training side can fine-tune it.

- `vlad(x, centres, weights)`: residual sums per centre, intra-normalisation,
  power normalisation, L2 (Jegou et al. 2010; Arandjelovic & Zisserman 2013).
- `VLAD`: hard assignment to a k-means codebook (Ng et al. 2015 on conv columns).
- `NetVLAD`: soft assignment by a 1x1 conv, learnable centres (Arandjelovic et al. 2016).
- `ColumnPCA`: per-location L2 -> 1x1 conv (PCA learned on train columns) -> L2.
- `SecondOrderFusion`: GeM first-order + reduced bilinear (second-order) pooling.
- `MultiLevelFusion`: ALISC-style fusion of several backbone stages.
- `MOPCNN`: multi-scale orderless pooling (Gong et al. 2014), patches
  approximated by feature-map windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pooling import GeM, mac
from .whitening import Whiten

# --------------------------------------------------------------------------- functional


def signed_power(x: torch.Tensor, alpha: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    """sign(x) |x|^alpha (power normalisation; alpha=0.5 is the signed square root)."""
    return torch.sign(x) * x.abs().clamp_min(eps).pow(alpha)


def hard_assign(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One-hot nearest-centre assignment of local descriptors x [N, D, M] to centres [K, D] -> [N, K, M]."""
    d = (centres * centres).sum(1)[None, :, None] - 2.0 * torch.matmul(centres, x)  # |x|^2 is constant over K
    idx = d.argmin(dim=1, keepdim=True)  # [N, 1, M]
    ks = torch.arange(centres.shape[0], device=x.device).view(1, -1, 1)
    return (idx == ks).to(x.dtype)


INTRA_EPS = 1e-2


def vlad(x: torch.Tensor, centres: torch.Tensor, weights: torch.Tensor | None = None, intra: bool = True,
         power: float | None = 0.5, eps: float = 1e-12, intra_eps: float = INTRA_EPS) -> torch.Tensor:
    """VLAD of local descriptors x [N, D, M] -> [N, K*D].

    V_k = sum_m a_km (x_m - c_k) with `weights` a [N, K, M] (hard assignment when
    None), then per-centre L2 (intra-normalisation), signed power `power`
    (None: skip), and a global L2. Intra-normalisation divides by
    max(|V_k|, intra_eps): a residual sum near zero (a cluster the image barely
    touches, or one whose centre is the mean of this image's own descriptors) is
    left small instead of blowing float noise up to a unit vector. Local
    descriptors are unit-norm, so real residual sums are far above 1e-2.
    """
    a = hard_assign(x, centres) if weights is None else weights
    v = torch.matmul(a, x.transpose(1, 2)) - a.sum(-1, keepdim=True) * centres[None]  # [N, K, D]
    if intra:
        v = F.normalize(v, dim=-1, eps=intra_eps)
    v = v.flatten(1)
    if power is not None:
        v = signed_power(v, power)
    return F.normalize(v, dim=-1, eps=eps)


def columns(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, C, h*w]: every spatial location is a local descriptor."""
    return x.flatten(2)


# --------------------------------------------------------------------------- fitting helpers (numpy in, numpy out)


def kmeans(X: np.ndarray, k: int, iters: int = 25, seed: int = 0, max_samples: int = 100_000) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on (a seeded sample of) the rows of X -> centres [k, D] float32."""
    rng = np.random.default_rng(seed)
    X = np.asarray(X, np.float32)
    if len(X) > max_samples:
        X = X[rng.choice(len(X), max_samples, replace=False)]
    if len(X) < k:
        raise ValueError(f"k-means with k={k} needs at least k samples, got {len(X)}")
    x = torch.from_numpy(X)
    x2 = (x * x).sum(1)
    # k-means++ seeding
    centres = [int(rng.integers(len(X)))]
    dmin = (x2 - 2 * x @ x[centres[0]] + x2[centres[0]]).clamp_min(0)
    for _ in range(1, k):
        p = dmin.double().numpy()
        p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1 / len(p))
        i = int(rng.choice(len(X), p=p))
        centres.append(i)
        dmin = torch.minimum(dmin, (x2 - 2 * x @ x[i] + x2[i]).clamp_min(0))
    c = x[centres].clone()
    for _ in range(iters):
        d = x2[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
        lab = d.argmin(1)
        counts = torch.bincount(lab, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, lab, x)
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        if empty.any():  # re-seed empty clusters at the worst-fitted points
            far = d.gather(1, lab[:, None])[:, 0].topk(int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c.numpy().astype(np.float32)


def netvlad_alpha(X: np.ndarray, centres: np.ndarray, ratio: float = 0.01) -> float:
    """Softmax sharpness so that, on average, the second-nearest centre gets `ratio` of the nearest's weight.

    (The initialisation of Arandjelovic et al.'s reference implementation.)
    """
    x = torch.from_numpy(np.asarray(X, np.float32))
    c = torch.from_numpy(np.asarray(centres, np.float32))
    d = torch.cdist(x, c).pow(2).topk(2, dim=1, largest=False).values
    gap = float((d[:, 1] - d[:, 0]).mean())
    return -math.log(ratio) / max(gap, 1e-12)


# --------------------------------------------------------------------------- modules


class ColumnPCA(nn.Module):
    """Per-location L2 -> 1x1 conv (PCA learned on train columns) -> L2: [N, C, h, w] -> [N, d, h, w]."""

    def __init__(self, in_dim: int, out_dim: int, normalize_input: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 1, bias=True)
        self.normalize_input = normalize_input

    @classmethod
    def from_whitening(cls, mean: np.ndarray, P: np.ndarray, normalize_input: bool = True) -> ColumnPCA:
        m = cls(P.shape[1], P.shape[0], normalize_input)
        w = Whiten.from_numpy(mean, P)
        with torch.no_grad():
            m.proj.weight.copy_(w.linear.weight[:, :, None, None])
            m.proj.bias.copy_(w.linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            x = F.normalize(x, dim=1)
        return F.normalize(self.proj(x), dim=1)


class VLAD(nn.Module):
    """Hard-assignment VLAD over the locations of a map [N, D, h, w] (or local descriptors [N, D, M]) -> [N, K*D]."""

    def __init__(self, centres: torch.Tensor | np.ndarray, power: float | None = 0.5, intra: bool = True):
        super().__init__()
        self.centres = nn.Parameter(torch.as_tensor(np.asarray(centres, np.float32)), requires_grad=False)
        self.power = power
        self.intra = intra

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = columns(x)
        return vlad(x, self.centres, None, self.intra, self.power)


class NetVLAD(nn.Module):
    """NetVLAD layer: soft assignment softmax_k(w_k . x + b_k) by a 1x1 conv, learnable centres c_k.

    Input [N, D, h, w]; each location is L2-normalised first; output [N, K*D]
    with intra-normalisation and a final L2. `from_centres` initialises it from a
    k-means codebook: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2, i.e. a softmax over
    -alpha |x - c_k|^2 (hard VLAD as alpha -> inf).
    """

    def __init__(self, dim: int, k: int, normalize_input: bool = True, power: float | None = None):
        super().__init__()
        self.assign = nn.Conv2d(dim, k, 1, bias=True)
        self.centres = nn.Parameter(torch.randn(k, dim) * 0.1)
        self.normalize_input = normalize_input
        self.power = power
        self.alpha: float | None = None

    @classmethod
    def from_centres(cls, centres: np.ndarray, alpha: float, normalize_input: bool = True,
                     power: float | None = None) -> NetVLAD:
        c = torch.from_numpy(np.asarray(centres, np.float32))
        m = cls(c.shape[1], c.shape[0], normalize_input, power)
        with torch.no_grad():
            m.centres.copy_(c)
            m.assign.weight.copy_((2.0 * alpha * c)[:, :, None, None])
            m.assign.bias.copy_(-alpha * (c * c).sum(1))
        m.alpha = alpha
        return m

    def soft_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D, h, w] -> [N, K, h*w], summing to 1 over K at every location."""
        if self.normalize_input:
            x = F.normalize(x, dim=1)
        return F.softmax(self.assign(x), dim=1).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            x = F.normalize(x, dim=1)
        a = F.softmax(self.assign(x), dim=1).flatten(2)
        return vlad(columns(x), self.centres, a, intra=True, power=self.power)


class SecondOrderFusion(nn.Module):
    """First-order GeM concatenated with reduced second-order (bilinear) pooling: [N, C, h, w] -> [N, C + out_dim].

    second order: 1x1 conv C -> r (PCA of train columns, centred), B = Z Z^T / hw
    (r x r, the covariance of the reduced features about the train mean), its
    upper triangle (r(r+1)/2 values), signed sqrt, L2, Linear to `out_dim`
    (PCA learned on train second-order vectors), L2. Both halves are
    L2-normalised, weighted by `mix` (learnable) and the concatenation L2-normalised.
    """

    def __init__(self, in_dim: int, reduce_dim: int = 64, out_dim: int = 512, p: float = 3.0):
        super().__init__()
        self.gem = GeM(p)
        self.reduce = nn.Conv2d(in_dim, reduce_dim, 1, bias=True)
        iu = torch.triu_indices(reduce_dim, reduce_dim)
        self.register_buffer("tri", iu[0] * reduce_dim + iu[1], persistent=False)
        self.project = nn.Linear(reduce_dim * (reduce_dim + 1) // 2, out_dim, bias=True)
        self.mix = nn.Parameter(torch.ones(2))

    @property
    def bilinear_dim(self) -> int:
        return int(self.tri.numel())

    def bilinear(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised second-order vector before projection: [N, r(r+1)/2]."""
        z = self.reduce(x).flatten(2)
        b = torch.matmul(z, z.transpose(1, 2)) / z.shape[-1]
        v = torch.index_select(b.flatten(1), 1, self.tri)
        return F.normalize(signed_power(v, 0.5), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.normalize(self.gem(x), dim=-1)
        second = F.normalize(self.project(self.bilinear(x)), dim=-1)
        return F.normalize(torch.cat([self.mix[0] * first, self.mix[1] * second], dim=1), dim=-1)


class MultiLevelFusion(nn.Module):
    """ALISC multi-level fusion: max-pool each stage's map to the smallest map size, 1x1 conv each,
    learned weighted sum, sum pooling, L2: (maps [N, C_l, h_l, w_l])_l -> [N, out_dim].

    Because the 1x1 convs, the weighted sum and the sum pooling are all linear,
    the graph sum-pools each max-pooled map first and applies the 1x1 convs as
    Linear layers (`fused_map` computes the literal order; a test checks both agree).
    `out_dim=None` gives the untrained "concatenation" initialisation: each conv
    is an identity into its own slot of sum(C_l) channels, so the output is the
    concatenation of the stages' sum-pooled maps weighted by `level_weights`.
    """

    def __init__(self, in_channels: Sequence[int], in_sizes: Sequence[tuple[int, int]], out_dim: int | None = None):
        super().__init__()
        if len(in_channels) != len(in_sizes) or not in_channels:
            raise ValueError("one channel count and one map size per level")
        oh, ow = min(s[0] for s in in_sizes), min(s[1] for s in in_sizes)
        self.kernels: list[tuple[int, int]] = []
        for h, w in in_sizes:
            if h % oh or w % ow:
                raise ValueError(f"map {h}x{w} does not max-pool evenly to {oh}x{ow}")
            self.kernels.append((h // oh, w // ow))
        concat = out_dim is None
        out = sum(in_channels) if concat else int(out_dim)
        self.out_dim = out
        self.convs = nn.ModuleList(nn.Linear(c, out, bias=False) for c in in_channels)
        self.level_weights = nn.Parameter(torch.ones(len(in_channels)))
        if concat:
            with torch.no_grad():
                start = 0
                for conv, c in zip(self.convs, in_channels, strict=True):
                    conv.weight.zero_()
                    conv.weight[start:start + c].copy_(torch.eye(c))
                    start += c

    def _pool(self, x: torch.Tensor, k: tuple[int, int]) -> torch.Tensor:
        return x if k == (1, 1) else F.max_pool2d(x, k, k)

    def fused_map(self, *feats: torch.Tensor) -> torch.Tensor:
        """The fused map [N, out_dim, oh, ow] before sum pooling (the literal ALISC order)."""
        out = 0
        for i, (x, k, conv) in enumerate(zip(feats, self.kernels, self.convs, strict=True)):
            y = F.conv2d(self._pool(x, k), conv.weight[:, :, None, None])
            out = out + self.level_weights[i] * y
        return out

    def forward(self, *feats: torch.Tensor) -> torch.Tensor:
        out = 0
        for i, (x, k, conv) in enumerate(zip(feats, self.kernels, self.convs, strict=True)):
            out = out + self.level_weights[i] * conv(self._pool(x, k).mean(dim=(-2, -1)))
        return F.normalize(out, dim=-1)


def window_grid(size: int, window: int, n: int) -> list[int]:
    """n evenly spaced window starts along an axis of `size` cells (first at 0, last at size - window)."""
    if n == 1 or window >= size:
        return [max(0, (size - window) // 2)]
    step = (size - window) / (n - 1)
    return sorted({min(int(math.floor(i * step + 0.5)), size - window) for i in range(n)})


class RegionMAC(nn.Module):
    """MAC of square windows on a static grid: [N, C, h, w] -> [N, C, R] (R = len(ys) * len(xs))."""

    def __init__(self, feature_size: tuple[int, int], window: int, n: int):
        super().__init__()
        h, w = feature_size
        self.window = min(window, h, w)
        ys, xs = window_grid(h, self.window, n), window_grid(w, self.window, n)
        self.register_buffer("ys", torch.tensor(ys), persistent=False)
        self.register_buffer("xs", torch.tensor(xs), persistent=False)
        self.n_regions = len(ys) * len(xs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = F.max_pool2d(x, self.window, stride=1)  # every window position
        m = torch.index_select(torch.index_select(m, 2, self.ys), 3, self.xs)
        return m.flatten(2)


class MOPCNN(nn.Module):
    """Multi-scale orderless pooling (Gong et al., ECCV 2014) on one feature map.

    Level 1: the global MAC of the whole map. Levels 2..: MAC of square windows
    (half and a quarter of the map side on 5x5 and 7x7 grids, the patch grids of
    the paper's 128 and 64 px patches on a 256 px image) stand in for the CNN
    activations of image patches; they are L2-normalised, PCA-reduced to
    `local_dim` (1x1, learned on train), L2-normalised and VLAD-encoded with a
    k-means codebook per level. Each level is then PCA-reduced to `level_dim`
    (learned on train) and L2-normalised; the levels are concatenated and
    L2-normalised again.
    """

    def __init__(self, in_dim: int, feature_size: tuple[int, int], local_dim: int = 128, k: int = 32,
                 level_dim: int = 512, scales: Sequence[tuple[float, int]] = ((0.5, 5), (0.25, 7))):
        super().__init__()
        side = min(feature_size)
        self.regions = nn.ModuleList(RegionMAC(feature_size, max(1, math.ceil(side * f)), n) for f, n in scales)
        self.local = nn.ModuleList(nn.Linear(in_dim, local_dim) for _ in scales)
        self.vlads = nn.ModuleList(VLAD(torch.zeros(k, local_dim)) for _ in scales)
        self.global_proj = Whiten(in_dim, level_dim)
        self.level_proj = nn.ModuleList(Whiten(k * local_dim, level_dim) for _ in scales)

    def global_feature(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(mac(x), dim=-1)

    def local_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Level `level` (0-based over the finer scales) local descriptors [N, local_dim, R], before VLAD."""
        r = F.normalize(self.regions[level](x), dim=1).transpose(1, 2)  # [N, R, C]
        return F.normalize(self.local[level](r), dim=-1).transpose(1, 2)

    def level_vlads(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.vlads[i](self.local_features(x, i)) for i in range(len(self.vlads))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.global_proj(self.global_feature(x))]
        parts += [proj(v) for proj, v in zip(self.level_proj, self.level_vlads(x), strict=True)]
        return F.normalize(torch.cat(parts, dim=1), dim=-1)
