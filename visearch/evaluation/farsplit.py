"""TF, a selection split closer to val's shift than TH (issue 19, item 1).

TH holds out the last 20 % of each product's train photos in file order. The file order is not a
capture sequence, and TH's queries are near-duplicates of photos left in training: every recipe
reaches TH mAP 0.98, and TH cannot tell recipes apart. TF holds out, per product, the same number
of photos (ceil(20 %)), chosen as the photos least like the rest of their product: one at a time,
the photo whose highest cosine similarity to the photos still in is the lowest leaves. The
similarity is the off-the-shelf descriptor's (ImageNet EfficientNet-Lite0 R-MAC, ONNX Runtime as
served), which no model here trained on. Val photos are never read.

The list is committed (`visearch/data/grocery-tf.txt`, the dataset-relative paths of the held-out
photos), so building the protocol needs no model. It is regenerated with

    visearch models build --off-the-shelf --repo runs/ots-repo --reduce-dim 0
    python -m visearch.evaluation.farsplit --model runs/ots-repo/embedder/1

Torch-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .protocols import HOLDOUT_FRACTION, TF_LIST, holdout_count


def far_holdout(emb: np.ndarray, groups: Sequence[int], fraction: float = HOLDOUT_FRACTION) -> list[int]:
    """Indices of the rows held out: per group of n > 1 rows, ceil(fraction * n), each the row whose
    highest cosine similarity to the group's rows still in is the lowest (ties: the earlier row)."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    groups = np.asarray(groups)
    out: list[int] = []
    for g in dict.fromkeys(groups.tolist()):
        rows = [int(i) for i in np.flatnonzero(groups == g)]
        for _ in range(holdout_count(len(rows), fraction)):
            sim = x[rows] @ x[rows].T
            np.fill_diagonal(sim, -np.inf)
            out.append(rows.pop(int(np.argmin(sim.max(axis=1)))))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    from visearch import datasets
    from visearch.evaluation.harness import stderr_progress
    from visearch.evaluation.runner import onnx_model_path
    from visearch.offline import OfflineEmbedder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the off-the-shelf embedder's version folder")
    ap.add_argument("--out", type=Path, default=TF_LIST)
    ap.add_argument("--fraction", type=float, default=HOLDOUT_FRACTION)
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        stderr_progress(f"grocery dataset not found: set {datasets.ENV_VAR}")
        return 2
    photos = sorted((p for p in datasets.grocery_split(root, "train") if p.is_product), key=lambda p: p.key)
    path, meta = onnx_model_path(args.model)
    model = OfflineEmbedder(path, meta.get("input_size"), 2)
    emb = model.embed_paths([p.path for p in photos], 32,
                            progress=lambda done, total: stderr_progress(f"  {done}/{total} photos"))
    held = far_holdout(emb, [p.fine_id for p in photos], args.fraction)
    header = [f"# TF: per product, the ceil({args.fraction:.0%}) train photos least like the rest "
              f"(visearch/evaluation/farsplit.py), by {meta.get('id', path.stem)} (model sha256 "
              f"{str(meta.get('model_sha256', '?'))[:12]}). Regenerate: python -m visearch.evaluation.farsplit "
              f"--model {args.model}"]
    args.out.write_text("\n".join(header + [photos[i].key for i in held]) + "\n", encoding="utf-8")
    stderr_progress(f"wrote {len(held)} of {len(photos)} product train photos to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
