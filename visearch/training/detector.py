"""Fine-tune the COCO SSD-MobileNetV2 into a class-agnostic "object of interest" detector.

    python -m visearch.training.detector [--out runs/detector] [--train 2000] [--epochs 40]
    visearch models build          # exports runs/detector/best.pt as the next detector version

COCO's 90 classes have no milk carton; what the search needs is "where is the product".
The recipe (CPU-sized, about 15 min on 2 cores):
- data: `visearch.composites` scenes, "train" split (train product photos and cut-out iconic
  images pasted into train shop photos, exact boxes); the held-aside "val" split scores it;
- model: the converted COCO network; its backbone and extra layers stay frozen (their six
  feature maps are computed once per scene and cached), the box-encoding heads start from
  COCO's (box regression is class-agnostic in SSD) and the class heads are new, two
  columns (background, object), bias-initialised to a 1 % prior;
- loss: SSD's, on the same 1917 anchors: an anchor is positive at IoU >= 0.5 with a truth (and
  each truth's best anchor is positive), negative under 0.4; sigmoid cross-entropy with
  3:1 hard-negative mining, smooth-L1 on the Faster R-CNN encodings of the positives;
- selection: the epoch with the best box AP@0.5 on a slice of the val composites.
Writes best.pt ({"model", "labels", "meta"}), history.json and a curve PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visearch import composites, datasets
from visearch import detector as det
from visearch.modeling import ssd

from . import params as packs
from .data import REPO_ROOT

LABELS = ["background", "object"]
POS_IOU, NEG_IOU, NEG_RATIO = 0.5, 0.4, 3


def anchor_corners() -> np.ndarray:
    a = ssd.anchors()
    return np.stack([a[:, 1] - a[:, 3] / 2, a[:, 0] - a[:, 2] / 2, a[:, 1] + a[:, 3] / 2, a[:, 0] + a[:, 2] / 2], 1)


def encode(truth: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(x1 y1 x2 y2) in 0..1 -> (ty, tx, th, tw) against (cy, cx, h, w) anchors: ssd.decode's inverse."""
    sy, sx, sh, sw = ssd.BOX_CODER_SCALES
    cy, cx = (truth[:, 1] + truth[:, 3]) / 2, (truth[:, 0] + truth[:, 2]) / 2
    h, w = np.maximum(truth[:, 3] - truth[:, 1], 1e-6), np.maximum(truth[:, 2] - truth[:, 0], 1e-6)
    return np.stack([(cy - anchors[:, 0]) / anchors[:, 2] * sy, (cx - anchors[:, 1]) / anchors[:, 3] * sx,
                     np.log(h / anchors[:, 2]) * sh, np.log(w / anchors[:, 3]) * sw], 1).astype(np.float32)


def match(truths: np.ndarray, corners: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor: label (1 object, 0 background, -1 ignored) and regression target."""
    labels = np.zeros(len(anchors), np.int64)
    targets = np.zeros((len(anchors), 4), np.float32)
    if len(truths) == 0:
        return labels, targets
    iou = det.box_iou(corners, truths)  # [A, T]
    best_t = iou.argmax(1)
    best_iou = iou.max(1)
    labels[(best_iou >= NEG_IOU) & (best_iou < POS_IOU)] = -1
    labels[best_iou >= POS_IOU] = 1
    forced = iou.argmax(0)  # every truth gets its best anchor
    labels[forced] = 1
    best_t[forced] = np.arange(len(truths))
    pos = labels == 1
    targets[pos] = encode(truths[best_t[pos]], anchors[pos])
    return labels, targets


def new_heads(model: ssd.SSDMobileNetV2) -> ssd.SSDMobileNetV2:
    """Two-class (background, object) class heads; box heads kept from COCO."""
    coco = model
    model = ssd.SSDMobileNetV2(num_classes=len(LABELS))
    state = {k: v for k, v in coco.state_dict().items() if ".cls." not in k}
    model.load_state_dict(state, strict=False)
    prior = float(np.log(0.01 / 0.99))
    for i, head in enumerate(model.heads):
        torch.nn.init.normal_(head.cls.weight, std=0.01)
        bias = torch.zeros(ssd.boxes_per_cell(i), len(LABELS))
        bias[:, 1] = prior
        bias[:, 0] = -prior
        head.cls.bias.data.copy_(bias.ravel())
    return model


@torch.no_grad()
def cache_maps(model: ssd.SSDMobileNetV2, paths: list[Path], batch: int = 16, log=print) -> list[torch.Tensor]:
    """The frozen network's six feature maps of every scene (float16)."""
    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in ssd.FEATURE_SIZES]
    t0 = time.perf_counter()
    for start in range(0, len(paths), batch):
        x = np.stack([det.prepare(Image.open(p).convert("RGB"), ssd.INPUT_SIZE)[0] for p in paths[start:start + batch]])
        maps = model.features(torch.from_numpy(x).permute(0, 3, 1, 2).float())
        for k, m in enumerate(maps):
            out[k].append(m.half())
        done = min(start + batch, len(paths))
        if done == len(paths) or (start // batch) % 20 == 0:
            rate = done / (time.perf_counter() - t0)
            log(f"feature maps {done}/{len(paths)} ({rate:.1f} scenes/s, ETA {(len(paths) - done) / rate:.0f}s)")
    return [torch.cat(parts) for parts in out]


def loss_fn(enc, logits, labels, targets):
    pos = labels == 1
    n_pos = pos.sum().clamp(min=1).float()
    target_cls = F.one_hot(pos.long(), len(LABELS)).float()
    per_anchor = F.binary_cross_entropy_with_logits(logits, target_cls, reduction="none").sum(-1)
    neg_loss = per_anchor.detach().clone()
    neg_loss[labels != 0] = -1.0
    k = (pos.sum(1, keepdim=True) * NEG_RATIO).clamp(min=NEG_RATIO * 2)
    rank = neg_loss.argsort(1, descending=True).argsort(1)
    hard_neg = (rank < k) & (labels == 0)
    cls_loss = (per_anchor * (pos | hard_neg)).sum() / n_pos
    box_loss = F.smooth_l1_loss(enc[pos], targets[pos], reduction="sum") / n_pos
    return cls_loss, box_loss


def predict(model: ssd.SSDMobileNetV2, maps: list[torch.Tensor], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        enc, logits = model.heads_forward([m[idx].float() for m in maps])
        return model.decode(enc).numpy(), torch.sigmoid(logits).numpy()


def score_ap(boxes: np.ndarray, scores: np.ndarray, truths: list[np.ndarray], labels: list[str], size: int,
             min_score: float = 0.05) -> float:
    """Box AP@0.5 of class-agnostic detections (the service's post-processing) against pixel truths."""
    frame = det.Frame(size, size, size, 1.0, 1.0)
    dets = []
    for b, s in zip(boxes, scores, strict=True):
        found = det.postprocess(b, s, frame, labels, min_score=min_score, iou=0.5, limit=20, min_side=2.0)
        dets.append((np.array([f.xyxy for f in found]).reshape(-1, 4), np.array([f.score for f in found])))
    return float(composites.average_precision(dets, truths))


def train(out: Path, n_train: int = 2500, n_val: int = 300, epochs: int = 40, batch: int = 32, lr: float = 1e-3,
          seed: int = 0, data_dir: Path | None = None, log=print) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    root = datasets.grocery_root()
    if root is None:
        raise FileNotFoundError(f"the grocery dataset is needed to compose training scenes: set ${datasets.ENV_VAR}")
    data_dir = data_dir or (REPO_ROOT / ".data" / "composites")
    size = ssd.INPUT_SIZE
    tr = composites.build_composites(root, data_dir / "train", "train", n_train, seed, size)
    va = composites.build_composites(root, data_dir / "val", "val", n_val, seed + 1, size)
    log(f"composites: {len(tr)} train, {len(va)} held-aside val scenes under {data_dir}")
    coco = ssd.SSDMobileNetV2.from_frozen_graph()
    maps_tr = cache_maps(coco, [c.path for c in tr], log=log)
    maps_va = cache_maps(coco, [c.path for c in va], log=log)
    truths_va = [np.array(c.boxes, np.float64).reshape(-1, 4) for c in va]
    ap_coco = score_ap(*predict(coco, maps_va, np.arange(len(va))), truths_va, ["background"] + ["coco"] * 90, size)
    log(f"COCO model, class-agnostic: val box AP@0.5 = {ap_coco:.3f}")

    corners, anchors = anchor_corners(), ssd.anchors()
    matched = [match(np.array(c.boxes, np.float64).reshape(-1, 4) / size, corners, anchors) for c in tr]
    labels_tr = torch.from_numpy(np.stack([m[0] for m in matched]))
    targets_tr = torch.from_numpy(np.stack([m[1] for m in matched]))
    model = new_heads(coco)
    params = [p for h in model.heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(tr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history, best = [], (-1.0, None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(tr))
        tot = [0.0, 0.0]
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            enc, logits = model.heads_forward([m[idx].float() for m in maps_tr])
            cls_loss, box_loss = loss_fn(enc, logits, labels_tr[idx], targets_tr[idx])
            opt.zero_grad()
            (cls_loss + box_loss).backward()
            opt.step()
            sched.step()
            tot[0] += cls_loss.item() * len(idx)
            tot[1] += box_loss.item() * len(idx)
        model.eval()
        ap = score_ap(*predict(model, maps_va, np.arange(len(va))), truths_va, LABELS, size)
        row = {"epoch": epoch, "cls_loss": tot[0] / len(tr), "box_loss": tot[1] / len(tr), "val_ap50": ap}
        history.append(row)
        if ap > best[0]:
            best = (ap, {k: v.clone() for k, v in model.state_dict().items()})
        el = time.perf_counter() - t0
        log(f"epoch {epoch}/{epochs}: cls {row['cls_loss']:.3f} box {row['box_loss']:.3f} val AP@0.5 {ap:.3f} "
            f"(best {best[0]:.3f}; ETA {el / epoch * (epochs - epoch):.0f}s)")
    meta = {"recipe": "frozen backbone+extras, new 2-class heads, COCO box heads fine-tuned", "n_train": len(tr),
            "n_val": len(va), "epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "val_ap50": best[0],
            "coco_val_ap50": ap_coco, "best_epoch": 1 + int(np.argmax([h["val_ap50"] for h in history]))}
    torch.save({"model": best[1], "labels": LABELS, "meta": meta}, out / "best.pt")
    (out / "history.json").write_text(json.dumps({"meta": meta, "history": history}, indent=1))
    _curve(history, ap_coco, out / "curve.png")
    log(f"wrote {out / 'best.pt'}: val AP@0.5 {best[0]:.3f} (COCO model {ap_coco:.3f})")
    return meta


DEFAULT_RECIPE = {"n_train": 2500, "n_val": 300, "epochs": 40, "batch": 32, "lr": 1e-3, "seed": 0}
PACK = "detector.npz"  # under params/: the default recipe's trained heads (`visearch models pack`)


def default_recipe(meta: dict) -> bool:
    """Whether a checkpoint's (or pack's) meta record is of DEFAULT_RECIPE."""
    return all(meta.get(k) == v for k, v in DEFAULT_RECIPE.items())


def default_checkpoint(progress=print, retrain: bool = False, runs: Path | None = None,
                       params: Path | None = None) -> Path | None:
    """runs/detector/best.pt of the default recipe, trained when missing or made by another recipe.

    None when the grocery dataset is missing (nothing to compose scenes from): the COCO
    conversion is served alone then.
    """
    if datasets.grocery_root() is None:
        progress("grocery dataset not found: serving the COCO detector without fine-tuning")
        return None
    out = (runs or REPO_ROOT / "runs") / "detector"
    best = out / "best.pt"
    if best.is_file() and not retrain:
        meta = torch.load(best, map_location="cpu", weights_only=False).get("meta", {})
        if default_recipe(meta):
            progress(f"detector: reusing {best} (val box AP@0.5 {meta.get('val_ap50', float('nan')):.3f})")
            return best
    if not retrain:
        pack_path = (params or packs.PARAMS_DIR) / PACK
        try:
            unpack(pack_path, best)
            progress(f"detector: wrote {best} from the trained parameters {pack_path} (to train them again: "
                     "visearch models build --retrain)")
            return best
        except packs.PackError as exc:
            progress(f"detector: not using the packed parameters: {exc}")
    r = DEFAULT_RECIPE
    progress(f"detector: fine-tuning on composited scenes into {out} (about 15 min on 2 cores)")
    train(out, r["n_train"], r["n_val"], r["epochs"], r["batch"], r["lr"], r["seed"], log=progress)
    return best


def _bases() -> tuple[dict[str, torch.Tensor], set[str]]:
    return packs.bases(lambda: new_heads(ssd.SSDMobileNetV2.from_frozen_graph()))


def pack(checkpoint: Path, out: Path) -> tuple[str, int]:
    """Pack the detector's training checkpoint (runs/detector/best.pt) as `out`; returns (sha256, tensors packed)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    arrays = packs.pack_state(ckpt["model"], *_bases())
    return packs.write_pack(out, arrays, dict(ckpt.get("meta", {}), labels=list(ckpt["labels"]))), packs.tensors(arrays)


def unpack(pack_path: Path, dest: Path) -> Path:
    """Writes the detector checkpoint `dest` from a pack of DEFAULT_RECIPE; PackError if it is not one."""
    arrays, meta = packs.read_pack(pack_path)
    if not default_recipe(meta):
        raise packs.PackError(f"{pack_path} was trained by another detector recipe")
    # One build's start is the base: every tensor whose start differs between builds is in the pack.
    state = packs.unpack_state(arrays, new_heads(ssd.SSDMobileNetV2.from_frozen_graph()).state_dict())
    labels = meta.pop("labels")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": state, "labels": labels, "meta": dict(meta, unpacked_from=packs.provenance(pack_path))}, tmp)
    os.replace(tmp, dest)
    return dest


def _curve(history: list[dict], baseline: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [h["cls_loss"] for h in history], label="classification")
    ax[0].plot(ep, [h["box_loss"] for h in history], label="box")
    ax[0].set_xlabel("epoch")
    ax[0].set_title("training loss")
    ax[0].legend()
    ax[1].plot(ep, [h["val_ap50"] for h in history], label="fine-tuned")
    ax[1].axhline(baseline, color="grey", ls="--", label="COCO, class-agnostic")
    ax[1].set_xlabel("epoch")
    ax[1].set_title("held-aside composites: box AP@0.5")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.training.detector", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/detector"))
    ap.add_argument("--train", type=int, default=DEFAULT_RECIPE["n_train"], help="training composites")
    ap.add_argument("--val", type=int, default=300, help="held-aside composites")
    ap.add_argument("--epochs", type=int, default=DEFAULT_RECIPE["epochs"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.train, args.val, args.epochs, args.batch, args.lr, args.seed, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
