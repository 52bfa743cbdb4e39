"""Weight-space ensembles (WiSE-FT, Wortsman et al., CVPR 2022): a fine-tuned model that keeps the
pretrained model's generality.

A model fine-tuned on 31 grocery products gains on them and loses on other instances (docs/TRAINING.md,
"Generic instance search"). Interpolating its weights with the weights it started from,
theta(a) = a * theta_ft + (1 - a) * theta_0, keeps most of the gain and gives back what was lost:
the fine-tuned units start from the ImageNet weights, so the two models are linearly connected. The
projection was learned from a random start; its pretrained counterpart is the identity (the
off-the-shelf descriptor), scaled to the fine-tuned projection's Frobenius norm so neither side
dominates the normalised output. The result is an ordinary checkpoint (same architecture, no
serving cost) that `visearch export` turns into a model version.

    python -m visearch.training.wise runs/default/best.pt --out runs/default-wise --report P1,P3,G,GR

The coefficient is chosen on selection protocols only: TH (held-out train photos; TH-CD for a
class-disjoint checkpoint) and GS
(OpenCV's sample photos, not in the reported generic protocols G/GR). The rule: the largest a whose
GS mAP is within `tolerance` of the off-the-shelf model's (a = 0), so the model forgets nothing
measurable, and among those the best TH mAP.
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
from .train import load_checkpoint, save_checkpoint, stderr

ALPHAS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
TOLERANCE = 0.01


def interpolate(checkpoint: Path, alpha: float):
    """(model, meta) of theta(alpha) between the checkpoint's start (ImageNet weights, identity
    projection) and the checkpoint itself."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    ft, meta = load_checkpoint(checkpoint)
    mcfg = tmodel.ModelConfig.from_dict(meta["config"]["model"])
    start = tmodel.make_model(mcfg)  # the ImageNet weights (the config's own)
    if start.head is not None:
        w = ft.head.weight.detach()
        with torch.no_grad():
            tmodel.init_identity(start.head)
            start.head.weight.mul_(w.norm() / start.head.weight.norm())
    s0, s1 = start.state_dict(), ft.state_dict()
    mixed = {}
    for k, v in s1.items():
        if v.dtype.is_floating_point:
            mixed[k] = alpha * v + (1.0 - alpha) * s0[k]
        else:
            mixed[k] = v
    start.load_state_dict(mixed, strict=True)
    meta = dict(meta)
    meta["wise"] = {"alpha": float(alpha), "from": str(checkpoint), "fine_tuned_id": meta.get("id")}
    return start.eval(), meta


@torch.no_grad()
def _embed(model, mcfg, photos, cache_root, batch: int = 64) -> np.ndarray:
    fc = data.FeatureCache(mcfg, cache_root or data.DEFAULT_CACHE)
    maps = fc.maps(photos)
    return torch.cat([tmodel.embed_from(model, torch.from_numpy(maps[i:i + batch]).float(), mcfg.cut)
                      for i in range(0, len(maps), batch)]).numpy()


def own_holdout(checkpoint: Path) -> str:
    """The train hold-out a checkpoint's split selects on."""
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    return data.HOLDOUT_OF_SPLIT[meta["train_split"]["split"]]


def sweep(checkpoint: Path, alphas=ALPHAS, names=("TH", "GS"), root: Path | None = None,
          cache_root: Path | None = None, progress=stderr) -> list[dict]:
    """Each alpha's metrics on the selection protocols (and any others named)."""
    from visearch.evaluation.harness import evaluate_embeddings
    from visearch.evaluation.protocols import get_protocols

    protos = get_protocols(root or datasets.grocery_root(), names)
    photos = list({p.path: p for pr in protos.values() for p in (*pr.queries, *pr.database)}.values())
    rows = []
    for a in alphas:
        model, meta = interpolate(checkpoint, a)
        mcfg = tmodel.ModelConfig.from_dict(meta["config"]["model"])
        emb = dict(zip([p.path for p in photos], _embed(model, mcfg, photos, cache_root), strict=True))
        row = {"alpha": a}
        for n, pr in protos.items():
            m = evaluate_embeddings(pr, np.stack([emb[p.path] for p in pr.queries]),
                                    np.stack([emb[p.path] for p in pr.database]))
            row[n] = {k: round(float(m[k]), 4) for k in ("mAP", "mAP@20", "recall@1")}
        progress(f"  alpha {a:.2f}: " + "  ".join(f"{n} mAP {row[n]['mAP']:.3f}" for n in protos))
        rows.append(row)
    return rows


def choose(rows: list[dict], tolerance: float = TOLERANCE, general: str = "GS", own: str = "TH") -> dict:
    """The row the rule picks (module docstring): GS within `tolerance` of alpha 0, then best TH."""
    base = next(r for r in rows if r["alpha"] == 0.0)[general]["mAP"]
    ok = [r for r in rows if r[general]["mAP"] >= base - tolerance] or [min(rows, key=lambda r: r["alpha"])]
    return max(ok, key=lambda r: (r[own]["mAP"], r["alpha"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.training.wise", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="run folder: best.pt (the chosen alpha) and wise.json")
    ap.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    ap.add_argument("--alpha", type=float, default=None, help="skip the sweep: write this alpha")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--report", default="", help="protocols scored at every alpha for the record, never used by the "
                    "rule, e.g. P1,P3,G,GR")
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        if args.alpha is None:
            own = own_holdout(args.checkpoint)
            report = tuple(n for n in args.report.split(",") if n and n not in (own, "GS"))
            rows = sweep(args.checkpoint, [float(a) for a in args.alphas.split(",")], (own, "GS", *report),
                         cache_root=args.cache)
            best = choose(rows, args.tolerance, own=own)
        else:
            rows, best = [], {"alpha": args.alpha}
        model, meta = interpolate(args.checkpoint, best["alpha"])
    except (ValueError, FileNotFoundError) as exc:
        stderr(f"wise: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    meta["wise"].update(selected_on={k: v for k, v in best.items() if k != "alpha"}, tolerance=args.tolerance)
    save_checkpoint(args.out / "best.pt", model, meta)
    (args.out / "wise.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "chosen": best, "sweep": rows},
                                                   indent=2) + "\n")
    print(json.dumps({"alpha": best["alpha"], "checkpoint": str(args.out / "best.pt"), **{
        k: v for k, v in best.items() if k != "alpha"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
