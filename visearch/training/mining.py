"""Same-item mining: find photos of the same item among unlabelled photos with the current descriptors.

    pairs = mine_pairs(emb, threshold=0.8, k=5)          # mutual k-NN edges with cosine >= threshold
    clusters = connected_clusters(len(emb), pairs)        # cluster id per photo (-1: unpaired)
    mining_precision(pairs, true_labels)                  # measured afterwards; mining never reads labels

The mined clusters become extra identities for a retraining round (`train(..., pseudo=...)`).
"""

from __future__ import annotations

import numpy as np


def mine_pairs(emb: np.ndarray, threshold: float, k: int = 5, mutual: bool = True) -> list[tuple[int, int]]:
    """Pairs (i < j) of rows that are each other's k nearest neighbours (or either's, `mutual=False`)
    with cosine similarity >= `threshold`. Rows of `emb` must be L2-normalised."""
    n = len(emb)
    if n < 2:
        return []
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, n - 1)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    knn = np.zeros((n, n), bool)
    knn[np.repeat(np.arange(n), k), nn.ravel()] = True
    edge = (knn & knn.T) if mutual else (knn | knn.T)
    edge &= sim >= threshold
    i, j = np.nonzero(np.triu(edge, 1))
    return list(zip(i.tolist(), j.tolist(), strict=True))


def connected_clusters(n: int, pairs: list[tuple[int, int]], min_size: int = 2) -> np.ndarray:
    """Cluster id per item from the pair graph's connected components; -1 for items in clusters below `min_size`."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    out = np.full(n, -1, np.int64)
    next_id = 0
    for r in np.unique(roots):
        members = np.flatnonzero(roots == r)
        if len(members) >= min_size:
            out[members] = next_id
            next_id += 1
    return out


def mining_precision(pairs: list[tuple[int, int]], labels: np.ndarray) -> dict:
    """Quality of mined pairs against the true labels (read only here, after mining).

    precision: share of mined pairs whose photos share a label; recall: share of all
    same-label pairs that were mined; also counts.
    """
    labels = np.asarray(labels)
    same = sum(int(labels[a] == labels[b]) for a, b in pairs)
    _, counts = np.unique(labels, return_counts=True)
    total_pos = int((counts * (counts - 1) // 2).sum())
    return {
        "pairs": len(pairs),
        "correct": same,
        "precision": same / len(pairs) if pairs else float("nan"),
        "recall": same / total_pos if total_pos else float("nan"),
        "true_pairs": total_pos,
    }


def cluster_purity(clusters: np.ndarray, labels: np.ndarray) -> dict:
    """Clustered photos, clusters, and the share of clustered photos carrying their cluster's majority label."""
    labels = np.asarray(labels)
    kept = clusters >= 0
    if not kept.any():
        return {"photos": 0, "clusters": 0, "purity": float("nan")}
    major = 0
    for c in np.unique(clusters[kept]):
        _, cnt = np.unique(labels[clusters == c], return_counts=True)
        major += int(cnt.max())
    return {"photos": int(kept.sum()), "clusters": int(len(np.unique(clusters[kept]))), "purity": major / int(kept.sum())}


def sweep(emb: np.ndarray, labels: np.ndarray, thresholds: list[float], k: int = 5) -> list[dict]:
    """Precision/recall of mining at each threshold (for choosing one on labelled data)."""
    return [{"threshold": t, "k": k, **mining_precision(mine_pairs(emb, t, k), labels)} for t in thresholds]


# --------------------------------------------------------------------------- mine, then retrain


def pool_photos(root, pool: str) -> list:
    """The unlabelled photos mining may look at.

    `cd-unseen`: train photos of products 44..58, the products a class-disjoint model never
    saw labelled. They are CD's database photos, so a model retrained on them is transductive
    for CD (it has seen the database, unlabelled; never a val photo) and is reported apart.
    """
    from visearch.datasets import grocery_split
    from visearch.evaluation.protocols import CD_TEST_IDS

    if pool == "cd-unseen":
        return [p for p in grocery_split(root, "train") if p.fine_id in set(CD_TEST_IDS)]
    raise ValueError(f"unknown mining pool {pool!r}: cd-unseen")


def choose_threshold(emb: np.ndarray, labels: np.ndarray, k: int, target: float, min_cluster: int = 2,
                     grid: tuple[float, ...] = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2))) -> tuple[float, list[dict]]:
    """The lowest threshold at which mining LABELLED photos (the training set) gives clusters of purity >= `target`.

    Cluster purity, not pair precision, is the criterion: a few wrong pairs chain whole
    identities together through the connected components that retraining uses.
    """
    rows = []
    for t in grid:
        pairs = mine_pairs(emb, float(t), k)
        purity = cluster_purity(connected_clusters(len(emb), pairs, min_cluster), labels)
        rows.append({"threshold": float(t), "k": k, **mining_precision(pairs, labels),
                     "cluster_purity": purity["purity"], "clustered_photos": purity["photos"]})
    ok = [r["threshold"] for r in rows if r["pairs"] and r["cluster_purity"] >= target]
    return (min(ok) if ok else max(grid)), rows


def mine_and_retrain(cfg, out, smoke: bool = False, cache_root=None, progress=None) -> dict:
    """Train on labelled photos, mine same-item clusters among `cfg.mining['pool']`, retrain with them.

    cfg.mining: {"pool": "cd-unseen", "k": 5, "target_purity": 0.9, "threshold": null (choose on the labelled
    training photos), "min_cluster": 2}. Writes `out/base/`, `out/mined/`, `out/mining.json`.
    """
    import dataclasses
    import json
    from pathlib import Path

    from visearch import datasets

    from . import data
    from .report import embed_checkpoint, evaluate_checkpoint
    from .train import stderr, train

    progress = progress or stderr
    out = Path(out)
    root = datasets.grocery_root()
    m = dict(cfg.mining)
    base_cfg = dataclasses.replace(cfg, mining={}, name=f"{cfg.name}-base")
    base = train(base_cfg, out / "base", progress, smoke, cache_root)

    pool = pool_photos(root, m.get("pool", "cd-unseen"))
    if smoke:
        pool = pool[::max(1, len(pool) // 24)][:24]
    k = int(m.get("k", 5))
    # Threshold from labelled data only: the base model's training photos (products, where same-item matters).
    train_photos, _ = data.training_protocol(root, cfg.split)
    labelled = [p for p in train_photos if p.is_product]
    if smoke:
        labelled = labelled[::max(1, len(labelled) // 24)][:24]
    lab_emb = embed_checkpoint(base.best, labelled, cache_root)
    lab_y = np.array([p.fine_id for p in labelled])
    threshold = m.get("threshold")
    sweep_rows: list[dict] = []
    if threshold is None:
        threshold, sweep_rows = choose_threshold(lab_emb, lab_y, k, float(m.get("target_purity", 0.9)),
                                                 int(m.get("min_cluster", 2)))
    emb = embed_checkpoint(base.best, pool, cache_root)
    pairs = mine_pairs(emb, float(threshold), k)
    clusters = connected_clusters(len(pool), pairs, int(m.get("min_cluster", 2)))
    pseudo = [(p, int(c)) for p, c in zip(pool, clusters, strict=True) if c >= 0]
    # Only now read the pool's labels, to measure what mining found.
    truth = np.array([p.fine_id for p in pool])
    quality = {"pairs": mining_precision(pairs, truth), "clusters": cluster_purity(clusters, truth),
               "threshold": float(threshold), "k": k, "pool": m.get("pool", "cd-unseen"), "pool_photos": len(pool)}
    progress(f"[{cfg.name}] mined {len(pairs)} pairs at cosine >= {threshold} (mutual {k}-NN): precision "
             f"{quality['pairs']['precision']:.3f}, recall {quality['pairs']['recall']:.3f}; "
             f"{quality['clusters']['clusters']} clusters over {quality['clusters']['photos']} photos, "
             f"purity {quality['clusters']['purity']:.3f}")
    mined = train(dataclasses.replace(cfg, name=f"{cfg.name}-mined"), out / "mined", progress, smoke, cache_root,
                  pseudo=pseudo)
    names = ("CD",) if cfg.split == "cd" else ("P1", "P3")
    if smoke:
        results = {}
    else:
        results = {"base": evaluate_checkpoint(base.best, names, root, cache_root),
                   "mined": evaluate_checkpoint(mined.best, names, root, cache_root)}
    summary = {"name": cfg.name, "best": str(mined.best), "base": str(base.best), "mining": quality,
               "threshold_sweep_on_labelled": sweep_rows,
               "holdout": {"base": base.meta["holdout_metrics"], "mined": mined.meta["holdout_metrics"]},
               "results": results, "seconds": round(base.seconds + mined.seconds, 1)}
    (out / "mining.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
