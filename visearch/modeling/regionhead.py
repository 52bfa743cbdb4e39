"""The embedder's region outputs, for query-adaptive re-ranking (visearch.regions, issue 5).

Beside `embeddings`, the exported embedder graph returns, from the same forward:

- `region_map` [N, h, w, R]: the last conv map projected per cell to the region space
  (R dims): the descriptor projection of the model (identity for an off-the-shelf model)
  followed by an uncentred PCA fitted on real photos. Both are linear and unbiased, so
  sum-pooling cells (a base region) and merging regions commute with them.
- `region_energy` [N, h, w, K]: the raw activations of K conv channels chosen for being
  spatially selective (the highest variance across cells on real photos): the "detectors"
  of feature-map pooling (FMP) base regions.
- `region_query` [N, R]: the global embedding projected by the same PCA, L2-normalised: the
  query side of region matching.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MAP_NAME, ENERGY_NAME, QUERY_NAME = "region_map", "region_energy", "region_query"
REGION_OUTPUTS = (MAP_NAME, ENERGY_NAME, QUERY_NAME)
DEFAULT_DIM, DEFAULT_CHANNELS = 256, 32


class RegionHead(nn.Module):
    def __init__(self, cell_proj: np.ndarray, query_proj: np.ndarray, channels: np.ndarray):
        """`cell_proj` [R, C] (conv channels -> region space), `query_proj` [R, D] (embedding ->
        region space), `channels` [K] (conv channel indices for FMP)."""
        super().__init__()
        self.register_buffer("cell_proj", torch.as_tensor(cell_proj, dtype=torch.float32))
        self.register_buffer("query_proj", torch.as_tensor(query_proj, dtype=torch.float32))
        self.register_buffer("channels", torch.as_tensor(channels, dtype=torch.long))

    @property
    def dim(self) -> int:
        return int(self.cell_proj.shape[0])

    def forward(self, fmap: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = fmap.permute(0, 2, 3, 1)  # NHWC
        region_map = x @ self.cell_proj.T
        energy = x.index_select(3, self.channels)
        q = embedding @ self.query_proj.T
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return region_map, energy, q

    def params(self) -> dict:
        return {"dim": self.dim, "channels": int(self.channels.numel()), "pca": "uncentred, fitted on real photos"}


def linear_part(head: nn.Module | None, channels: int) -> np.ndarray:
    """The descriptor projection's matrix [D, C] (identity without one). Its bias, if any, is
    left out: a region is a sum of cells, and a bias does not sum."""
    if head is None:
        return np.eye(channels, dtype=np.float32)
    weight = getattr(head, "weight", None)
    if weight is None:
        raise TypeError(f"region outputs need a linear descriptor head, not {type(head).__name__}")
    return weight.detach().cpu().numpy().astype(np.float32)


def fit_region_head(fmaps: np.ndarray, head: nn.Module | None, dim: int = DEFAULT_DIM,
                    n_channels: int = DEFAULT_CHANNELS) -> RegionHead:
    """Fit the PCA and pick the FMP channels on conv maps [N, C, h, w] of real photos."""
    n, c, h, w = fmaps.shape
    cells = fmaps.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    lin = linear_part(head, c).astype(np.float64)  # [D, C]
    projected = cells @ lin.T  # [cells, D]
    second = projected.T @ projected / len(projected)
    vals, vecs = np.linalg.eigh(second)
    basis = vecs[:, np.argsort(-vals)[: min(dim, second.shape[0])]].T  # [R, D], orthonormal rows
    variance = fmaps.transpose(1, 0, 2, 3).reshape(c, n, h * w).var(axis=2).mean(axis=1)
    channels = np.sort(np.argsort(-variance, kind="stable")[: min(n_channels, c)])
    return RegionHead((basis @ lin).astype(np.float32), basis.astype(np.float32), channels)
