"""Score training checkpoints on the retrieval protocols (through the frozen-feature cache) and tabulate them.

    python -m visearch.training.report runs/loss-*/best.pt runs/cd-*/best.pt --out runs/loss-table.json

A checkpoint trained on split `all` is scored on P1 and P3, one trained on `cd` on CD
(never the other way round: an `all` model has seen products 44..58). Embeddings come
from the cached frozen maps plus the checkpoint's top units in torch, which is the
exported ONNX model's function (parity 1e-4); the served default is also scored through
ONNX Runtime by `visearch eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from visearch import datasets

from . import data
from . import model as tmodel
from .train import load_checkpoint, stderr

# trainval (the production model) trained on the val photos P1 and P3 query with: only TH is honest for it.
PROTOCOLS_OF_SPLIT = {"all": ("P1", "P3"), "cd": ("CD",), "trainval": ("TH",), "far": ("P1", "P3"), "iconic": ("P1", "P3"),
                      "trainval-iconic": ("TH",)}
METRICS = ("mAP", "mAP@20", "recall@1", "recall@5", "recall@10")


@torch.no_grad()
def embed_checkpoint(checkpoint: Path, photos: list, cache_root: Path | None = None, batch: int = 64) -> np.ndarray:
    """L2-normalised embeddings of `photos` by the checkpoint's model, from cached frozen maps."""
    model, meta = load_checkpoint(checkpoint)
    mcfg = tmodel.ModelConfig.from_dict(meta["config"]["model"])
    fc = data.FeatureCache(mcfg, cache_root or data.DEFAULT_CACHE)
    maps = fc.maps(photos)
    out = [tmodel.embed_from(model, torch.from_numpy(maps[i:i + batch]).float(), mcfg.cut)
           for i in range(0, len(maps), batch)]
    return torch.cat(out).numpy()


def evaluate_checkpoint(checkpoint: Path, names: tuple[str, ...] | None = None, root: Path | None = None,
                        cache_root: Path | None = None) -> dict[str, dict]:
    """{protocol: metrics} of a checkpoint on the protocols its training split allows (or `names`)."""
    from visearch.evaluation.harness import evaluate_embeddings
    from visearch.evaluation.protocols import get_protocols

    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    names = names or PROTOCOLS_OF_SPLIT[meta["train_split"]["split"]]
    root = root or datasets.grocery_root()
    protos = get_protocols(root, names)
    photos = list({p.path: p for pr in protos.values() for p in (*pr.queries, *pr.database)}.values())
    emb = dict(zip([p.path for p in photos], embed_checkpoint(checkpoint, photos, cache_root), strict=True))
    out = {}
    for n, pr in protos.items():
        m = evaluate_embeddings(pr, np.stack([emb[p.path] for p in pr.queries]), np.stack([emb[p.path] for p in pr.database]))
        out[n] = {k: round(float(m[k]), 4) for k in METRICS} | {"n_queries": m["n_queries"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.training.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for ck in args.checkpoints:
        meta = torch.load(ck, map_location="cpu", weights_only=True)["meta"]
        res = evaluate_checkpoint(ck)
        hist = ck.parent / "history.json"
        seconds = json.loads(hist.read_text()).get("seconds") if hist.exists() else None
        rows.append({"checkpoint": str(ck), "name": meta["config"]["name"], "loss": meta["loss"], "id": meta["id"],
                     "split": meta["train_split"]["split"], "epoch": meta["epoch"], "holdout": meta["holdout_metrics"],
                     "train_seconds": seconds, "results": res})
        line = "  ".join(f"{n} mAP {r['mAP']:.3f} mAP@20 {r['mAP@20']:.3f} R@1 {r['recall@1']:.3f}" for n, r in res.items())
        stderr(f"{meta['config']['name']:28} {line}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
