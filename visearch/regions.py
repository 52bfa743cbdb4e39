"""Region descriptors and query-adaptive matching (Cao et al., "Where to Focus", arXiv 1606.06811).

Numpy only: this runs in the embedding service (base regions at ingestion) and the
re-ranking service (matching at query time); serving never imports torch.

    cells = region_map(...)                        # [h, w, D] projected conv map of one image
    regions = base_regions(cells)                  # Regions: OSPP + FMP boxes and their sum-pooled features
    score, weights = qam(query, regions.features)  # best cosine over merged regions (NNLS)
    box = merged_box(regions.boxes, weights)       # where the match is, normalised [0, 1] coordinates

Base regions are sum-pooled from the map, so merging regions is adding their features
and any projection that is linear (no centring) commutes with it: the map the model
exports is already projected to the region dimension. Query-adaptive matching looks for
the merged region whose descriptor is the most similar to the query: with non-negative
merge weights z, maximise cos(q, F z). The maximum is reached at the projection of q onto
the cone {F z : z >= 0}, which is a non-negative least-squares problem (solved exactly by
Lawson-Hanson's active set below); binary z (a plain union of regions) is the special case
the relaxation contains. "max over base regions" (`max_region`) is the variant without
merging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-12
# Re-rank methods that match the query's region vector (RegionSet.query) against base regions.
REGION_METHODS = ("regions", "qam")
# Every re-rank method the re-rank service offers (services/rerank/server.py).
RERANK_METHODS = ("none", *REGION_METHODS, "qe", "verify")


@dataclass(frozen=True)
class Regions:
    """Base regions of one image: boxes [R, 4] (x1, y1, x2, y2 in [0, 1] of the image) and
    their sum-pooled features [R, D] (not normalised: merging is adding)."""

    boxes: np.ndarray
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


# --------------------------------------------------------------------------- base regions


def ospp_cells(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """Overlapped spatial pyramid: at level l (1..levels) an l x l grid of windows of
    2/(l+1) of the map's height and width, consecutive windows overlapping by half.
    Returns (r0, c0, r1, c1) cell ranges, end exclusive, de-duplicated, coarse first."""
    out: list[tuple[int, int, int, int]] = []
    for lvl in range(1, levels + 1):
        wh, ww = max(1, round(2 * h / (lvl + 1))), max(1, round(2 * w / (lvl + 1)))
        rows = _starts(h, wh, lvl)
        cols = _starts(w, ww, lvl)
        for r in rows:
            for c in cols:
                cell = (r, c, r + wh, c + ww)
                if cell not in out:
                    out.append(cell)
    return out


def _starts(size: int, win: int, n: int) -> list[int]:
    """`n` window starts spread evenly from 0 to size - win (fewer when the map is too small)."""
    if n == 1 or size <= win:
        return [0]
    return sorted({round(i * (size - win) / (n - 1)) for i in range(n)})


def fmp_cells(activation: np.ndarray, n: int = 8, quantile: float = 0.75) -> list[tuple[int, int, int, int]]:
    """Feature-map pooling base regions: each channel of the conv map is a detector of one
    pattern; where a channel fires strongly (above its `quantile` over the map) is a region
    of interest. The bounding boxes of the `n` most energetic channels' supports, merged
    when they nearly coincide (IoU > 0.7), are the base regions. `activation` is the
    non-negative map [h, w, C] (post-ReLU)."""
    h, w, c = activation.shape
    energy = activation.reshape(h * w, c)
    order = np.argsort(-energy.sum(0), kind="stable")
    out: list[tuple[int, int, int, int]] = []
    for ch in order:
        m = activation[:, :, ch]
        if m.max() <= 0:
            break
        thr = max(np.quantile(m, quantile), 0.5 * m.max())
        rows, cols = np.nonzero(m >= thr)
        cell = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        if cell == (0, 0, h, w) or any(_iou(cell, o) > 0.7 for o in out):
            continue
        out.append(cell)
        if len(out) == n:
            break
    return out


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    r0, c0, r1, c1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def pool_cells(cells: np.ndarray, ranges: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum-pool `cells` [h, w, D] over each cell range; boxes normalised to [0, 1]."""
    h, w, d = cells.shape
    integral = np.zeros((h + 1, w + 1, d), np.float64)
    integral[1:, 1:] = cells.astype(np.float64).cumsum(0).cumsum(1)
    feats = np.empty((len(ranges), d), np.float32)
    boxes = np.empty((len(ranges), 4), np.float32)
    for i, (r0, c0, r1, c1) in enumerate(ranges):
        feats[i] = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        boxes[i] = (c0 / w, r0 / h, c1 / w, r1 / h)
    return boxes, feats


def base_regions(cells: np.ndarray, activation: np.ndarray | None = None, levels: int = 3, fmp: int = 8) -> Regions:
    """OSPP regions (and FMP regions when `activation` is given) of one image's projected map."""
    h, w, _ = cells.shape
    ranges = ospp_cells(h, w, levels)
    if activation is not None and fmp > 0:
        ranges += [r for r in fmp_cells(activation, fmp) if r not in ranges]
    boxes, feats = pool_cells(cells, ranges)
    return Regions(boxes, feats)


# --------------------------------------------------------------------------- matching


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None, tol: float = 1e-10) -> np.ndarray:
    """argmin_x ||A x - b|| subject to x >= 0 (Lawson & Hanson's active-set method).

    `a` [m, n], `b` [m]. Works on the Gram matrix, so m (the descriptor dimension) may be
    large while n (the number of regions) stays small."""
    n = a.shape[1]
    ata = a.T @ a
    atb = a.T @ b
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    max_iter = max_iter or 3 * n
    grad = atb - ata @ x
    for _ in range(max_iter):
        if passive.all() or grad[~passive].max(initial=-np.inf) <= tol:
            break
        j = np.flatnonzero(~passive)[np.argmax(grad[~passive])]
        passive[j] = True
        while True:
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = _solve(ata[idx][:, idx], atb[idx])
            if s[idx].min() > 0:
                break
            neg = idx[s[idx] <= 0]
            alpha = np.min(x[neg] / np.maximum(x[neg] - s[neg], EPS))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = s
        grad = atb - ata @ x
    return x


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The unconstrained least-squares step on the passive set (normal equations)."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # linearly dependent regions: any minimiser will do
        return np.linalg.lstsq(a, b, rcond=None)[0]


def qam(query: np.ndarray, features: np.ndarray) -> tuple[float, np.ndarray]:
    """Query-adaptive matching: the best cosine between `query` [D] and a non-negative
    combination of the base-region features [R, D]; returns (score, merge weights [R])."""
    if len(features) == 0:
        return 0.0, np.zeros(0)
    f = features.astype(np.float64)
    q = query.astype(np.float64)
    z = nnls(f.T, q)
    merged = z @ f
    norm = np.linalg.norm(merged)
    if norm < EPS:  # the query points away from every region: fall back to the best single one
        score, best = max_region(query, features)
        z = np.zeros(len(features))
        z[best] = 1.0
        return score, z
    return float(q @ merged / (np.linalg.norm(q) * norm)), z


def max_region(query: np.ndarray, features: np.ndarray) -> tuple[float, int]:
    """The 'max over base regions' variant: the best cosine of one region; (score, index)."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), EPS)
    sims = f @ (query / max(np.linalg.norm(query), EPS))
    i = int(np.argmax(sims))
    return float(sims[i]), i


def merged_box(boxes: np.ndarray, weights: np.ndarray, share: float = 0.1) -> np.ndarray:
    """The box of a merged region: the union of the base regions carrying at least `share`
    of the merge weight."""
    if len(weights) == 0 or weights.max() <= 0:
        return np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    keep = weights >= share * weights.max()
    b = boxes[keep]
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], np.float32)


def match(method: str, query: np.ndarray, features: np.ndarray, boxes: np.ndarray) -> tuple[float, np.ndarray]:
    """One candidate by a region method: (score, box of the matched region) for "regions"
    (the best single base region) or "qam" (the best merge)."""
    if method == "regions":
        score, best = max_region(query, features)
        return score, boxes[best]
    if method == "qam":
        score, z = qam(query, features)
        return score, merged_box(boxes, z)
    raise ValueError(f"{method!r} is not a region method ({', '.join(REGION_METHODS)})")


# --------------------------------------------------------------------------- query expansion


def alpha_qe(query: np.ndarray, db: np.ndarray, scores: np.ndarray, k: int = 5, alpha: float = 3.0) -> np.ndarray:
    """alpha-weighted query expansion (Radenovic et al.): the query plus its top-k
    neighbours weighted by similarity^alpha, L2-normalised. `db` [N, D] in score order."""
    k = min(k, len(db))
    w = np.clip(scores[:k], 0, None) ** alpha
    q = query + (w[:, None] * db[:k]).sum(0)
    return q / max(np.linalg.norm(q), EPS)


def dba(db: np.ndarray, k: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Database-side augmentation: each vector replaced by itself plus its k nearest
    neighbours among `db` (similarity^alpha weights), L2-normalised."""
    sims = db @ db.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, : k + 1]  # itself first
    w = np.clip(np.take_along_axis(sims, order, 1), 0, None) ** alpha
    out = (w[:, :, None] * db[order]).sum(1)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), EPS)
