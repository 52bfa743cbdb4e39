"""The training loop: cached frozen maps (CPU recipe) or full images with augmentation (GPU recipe).

    run = train(load_config("configs/default.json"), out=Path("runs/default"))

Writes to `out`: `best.pt` (best hold-out mAP) and `last.pt` (checkpoints with a `meta`
record the exporter reads back), `history.json` (per-epoch loss and hold-out metrics),
`loss.png` (the curves) and `train.log`-style progress on stderr.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visearch import datasets
from visearch.modeling import backbones
from visearch.modeling.embedder import NORMALISATION, Embedder

from . import data, losses
from . import model as tmodel

Progress = Callable[[str], None]
SMOKE_PER_CLASS, SMOKE_STEPS = 6, 4
SPLIT_TEXT = {"all": "train minus the TH hold-out; val never used",
              "cd": "train minus products 44..58 and the TH-CD hold-out; val never used",
              "trainval": "train minus the TH hold-out, plus every val photo of a product (the production model)",
              "far": "train minus the TF hold-out (each product's photos least like the rest); val never used",
              "iconic": "train minus the TH hold-out, plus each product's iconic image; val never used",
              "trainval-iconic": "train minus the TH hold-out, plus every val photo and the iconic image of a product"}


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    name: str = "default"
    description: str = ""
    seed: int = 0
    # "all" (P1/P3 models, selected on TH), "cd" (class-disjoint models, selected on TH-CD) or "trainval"
    # (the production model: all's photos plus val's, selected on TH) or "far" (P1/P3 models, selected on TF)
    split: str = "all"
    model: tmodel.ModelConfig = field(default_factory=tmodel.ModelConfig)
    loss: dict = field(default_factory=lambda: {"name": "norm_softmax", "scale": 16.0, "margin": 0.1})
    epochs: int = 8  # fine-tuning epochs (top units + pooling + projection)
    head_epochs: int = 0  # first, epochs of the projection alone on pooled frozen descriptors (linear probe)
    head_lr: float = 1e-3
    head_eval_every: int = 10
    p: int = 16  # classes per batch
    k: int = 4  # photos per class
    steps_per_epoch: int = 0  # 0: photos / (p*k)
    lr: float = 1e-3  # projection, pooling and loss parameters
    backbone_lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    crop: int = 0  # random crop of cached maps (cells); 0 = off
    flip: bool = True  # random mirror of cached maps
    views: list = field(default_factory=lambda: ["id"])  # cached input views: "id", "hflip", "aug0", "aug1", ...
    view_mix: str = "batch"  # "batch": one view drawn per batch; "sample": one per photo
    cache: bool = True  # False: full images each step (the GPU recipe)
    image_augment: dict = field(default_factory=dict)  # image mode: {"scale": [0.5, 1], "jitter": 0.3, "flip": true}
    batch_workers: int = 4
    mining: dict = field(default_factory=dict)  # {"pool": ..., "threshold": .., "k": ..} see training/mining.py
    threads: int = 0  # torch threads; 0 = min(2, cores)
    eval_every: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        d["model"] = tmodel.ModelConfig.from_dict(d.get("model", {}))
        if d.get("view_mix", "batch") not in ("batch", "sample"):
            raise ValueError(f"view_mix {d['view_mix']!r}: 'batch' or 'sample'")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__}
        d["model"] = self.model.to_dict()
        return d


def load_config(path: Path) -> TrainConfig:
    """A JSON (or YAML, when PyYAML is installed) training config."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    return TrainConfig.from_dict(raw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    out: Path
    best: Path
    history: list[dict]
    meta: dict
    seconds: float
    epochs_run: int = 0  # fine-tuning epochs run (fewer than planned under a budget or after a SIGINT)
    interrupted_in_epoch: int | None = None


class _Source:
    """Where a step's inputs come from: cached maps (+ views) or decoded images."""

    def __init__(self, cfg: TrainConfig, photos: list, progress: Progress, cache_root: Path | None):
        self.cfg = cfg
        self.photos = photos
        self.index = {p.path: i for i, p in enumerate(photos)}
        if cfg.cache:
            self.fc = data.FeatureCache(cfg.model, cache_root or data.DEFAULT_CACHE, progress=progress)
            self.maps = {v: torch.from_numpy(self.fc.maps(photos, v)) for v in cfg.views}
        self.start = cfg.model.cut if cfg.cache else 0

    def batch(self, idx: np.ndarray, rng: torch.Generator, npr: np.random.Generator, train: bool) -> torch.Tensor:
        if self.cfg.cache:
            views = self.cfg.views
            if train and len(views) > 1 and self.cfg.view_mix == "sample":  # a view drawn per photo
                pick = npr.integers(len(views), size=len(idx))
                x = torch.stack([self.maps[views[v]][int(i)] for v, i in zip(pick, idx, strict=True)]).float()
            else:  # one view drawn per batch (the first when not training)
                view = views[int(npr.integers(len(views)))] if train and len(views) > 1 else views[0]
                x = self.maps[view][torch.from_numpy(idx)].float()
            if train:
                x = data.augment_maps(x, rng, self.cfg.crop, self.cfg.flip)
            return x
        from concurrent.futures import ThreadPoolExecutor

        from .augment import augmented_input

        size = self.cfg.model.size
        if train:  # one child generator per image, drawn in order: deterministic whatever the thread timing
            seeds = npr.integers(0, 2**63, len(idx))
            jobs = [(self.photos[i].path, np.random.default_rng(s)) for i, s in zip(idx, seeds, strict=True)]
            fn = lambda job: augmented_input(job[0], size, job[1], self.cfg.image_augment)  # noqa: E731
        else:
            jobs = [self.photos[i].path for i in idx]
            fn = lambda path: data.load_input(path, size)  # noqa: E731
        with ThreadPoolExecutor(max(1, self.cfg.batch_workers)) as pool:
            imgs = list(pool.map(fn, jobs))
        return torch.from_numpy(np.stack(imgs))

    def embed(self, model: Embedder, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = x.to(device)
        if self.cfg.cache:
            return tmodel.embed_from(model, x, self.start)
        return tmodel.embed_from(model, tmodel.normalise_images(model, x), 0)


@torch.no_grad()
def embed_photos(model: Embedder, source: _Source, photos: list, device: torch.device, batch: int = 64) -> np.ndarray:
    model.eval()
    idx = np.array([source.index[p.path] for p in photos])
    out = [source.embed(model, source.batch(idx[i:i + batch], None, None, False), device).cpu()
           for i in range(0, len(idx), batch)]
    return torch.cat(out).numpy()


@torch.no_grad()
def pooled_descriptors(model: Embedder, source: _Source, device: torch.device, batch: int = 64) -> np.ndarray:
    """Pooled descriptors (before the projection) of every photo of `source`, in its order."""
    model.eval()
    out = []
    for i in range(0, len(source.photos), batch):
        x = source.batch(np.arange(i, min(i + batch, len(source.photos))), None, None, False).to(device)
        if not source.cfg.cache:
            x = tmodel.normalise_images(model, x)
        out.append(tmodel.pool_features(model, tmodel.run_units(model, x, source.start)).cpu())
    return torch.cat(out).numpy()


def holdout_metrics(model: Embedder, source: _Source, proto, device: torch.device) -> dict:
    from visearch.evaluation.harness import evaluate_embeddings

    q = embed_photos(model, source, proto.queries, device)
    db = embed_photos(model, source, proto.database, device)
    m = evaluate_embeddings(proto, q, db)
    return {k: m[k] for k in ("mAP", "mAP@20", "recall@1", "recall@5", "recall@10", "n_queries")}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def model_id(meta: dict, state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().numpy().tobytes())
    m = meta
    pool = {"gem": f"gem{m['pooling_params'].get('p', 3):g}".replace(".", "_"),
            "rmac": f"rmac{m['pooling_params'].get('levels', 3)}"}.get(m["pooling"], m["pooling"])
    return f"{m['architecture']}-{pool}-{m['input_size']}-ft-{m['loss']['name']}-d{m['dim']}-{h.hexdigest()[:8]}"


def make_meta(cfg: TrainConfig, model: Embedder, train_photos: list, proto, metrics: dict, epoch: int,
              extra: dict | None = None) -> dict:
    mc = cfg.model
    mean, std = NORMALISATION[mc.arch]
    wfile = backbones.weights_path(mc.arch)
    dim = mc.dim or backbones.SPECS[mc.arch].dim
    classes = sorted({p.fine_id for p in train_photos})
    meta = {
        "architecture": mc.arch,
        "weights_package": backbones.SPECS[mc.arch].package,
        "weights_sha256": backbones.sha256_file(wfile),
        "pooling": mc.pooling,
        "pooling_params": model.pool.params(),
        "whitening": ({"type": "learned projection", "init": mc.whitening_init, "in": backbones.SPECS[mc.arch].dim,
                       "out": mc.dim} if mc.dim else None),
        "mean": [round(m, 6) for m in mean],
        "std": [round(s, 6) for s in std],
        "input_size": mc.size,
        "dim": dim,
        "loss": cfg.loss,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "train_split": {
            "split": cfg.split,
            "description": f"{len(train_photos)} photos of {len(classes)} fine classes ({SPLIT_TEXT[cfg.split]})",
            "n_photos": len(train_photos),
            "fine_ids": classes,
            "selection": f"{proto.name}: {proto.description}",
        },
        "holdout_metrics": metrics,
        "epoch": epoch,
        "torch_version": str(torch.__version__),
    }
    if extra:
        meta.update(extra)
    return meta


def save_checkpoint(path: Path, model: Embedder, meta: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = dict(meta, id=model_id(meta, state))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"meta": meta, "state_dict": state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[Embedder, dict]:
    """The Embedder of a checkpoint (eval mode) and its meta record."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    mcfg = tmodel.ModelConfig.from_dict(meta["config"]["model"])
    model = tmodel.make_model(mcfg)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), meta


def plot_history(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = [h["epoch"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ev = [h for h in history if "holdout" in h]
    ax2.plot([h["epoch"] for h in ev], [h["holdout"]["mAP"] for h in ev], "s--", color="tab:red", label="hold-out mAP")
    ax2.plot([h["epoch"] for h in ev], [h["holdout"]["recall@1"] for h in ev], "^:", color="tab:green",
             label="hold-out R@1")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("hold-out metric")
    fig.legend(loc="lower right", fontsize=8, bbox_to_anchor=(0.88, 0.18))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def epochs_within(budget: float, elapsed: float, epoch_s: float, eval_s: float, eval_every: int, done: int,
                  planned: int) -> int:
    """How many fine-tuning epochs in all fit in `budget` seconds: `done` of them brought the run to `elapsed`
    seconds, each further one takes `epoch_s` plus an evaluation (`eval_s`) every `eval_every`, and the last one is
    always evaluated. Never fewer than `done` nor more than `planned`."""
    per_epoch = epoch_s + eval_s / max(1, eval_every)
    room = budget - elapsed - eval_s
    return max(done, min(planned, done + int(room // per_epoch))) if per_epoch > 0 else planned


def train(cfg: TrainConfig, out: Path, progress: Progress = stderr, smoke: bool = False, cache_root: Path | None = None,
          root: Path | None = None, pseudo: list[tuple[datasets.Photo, int]] | None = None,
          budget: float | None = None) -> Run:
    """Train per `cfg`, select on the split's hold-out, write checkpoints, history and curves into `out`.

    `pseudo` (from same-item mining): unlabelled photos with a mined cluster id; each cluster
    is one extra identity. Their true labels are never read; their attributes are unknown
    (ignored by the attribute heads).

    `budget` (seconds, the whole run): after each fine-tuning epoch the epochs still planned are cut to what
    the measured pace fits (`epochs_within`), so the learning-rate schedule runs to its end inside the budget
    instead of being cut by a timeout. A SIGINT during fine-tuning stops the run as finished once a checkpoint
    has been evaluated: `best.pt` is the best evaluated, history.json says where it stopped.
    """
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads or min(2, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = root or datasets.grocery_root()
    if root is None:
        raise FileNotFoundError(f"grocery dataset not found: set {datasets.ENV_VAR}")
    train_photos, proto = data.training_protocol(root, cfg.split)
    if smoke:  # a handful of real photos: 4 products, 6 photos each, plus the small hold-out's database
        proto = proto.limited(4, 4)
        classes = {p.fine_id for p in proto.queries}
        per_class: dict[int, list] = {}
        for p in train_photos:
            if p.fine_id in classes and len(per_class.setdefault(p.fine_id, [])) < SMOKE_PER_CLASS:
                per_class[p.fine_id].append(p)
        picked = [p for ps in per_class.values() for p in ps]
        train_photos = list({p.path: p for p in (*picked, *proto.database)}.values())
    pseudo = pseudo or []
    pseudo_photos = [p for p, _ in pseudo]
    all_photos = list({p.path: p for p in (*train_photos, *proto.queries, *proto.database, *pseudo_photos)}.values())
    out.mkdir(parents=True, exist_ok=True)
    progress(f"[{cfg.name}] {len(train_photos)} training photos ({cfg.split}), selection on {proto.name} "
             f"({len(proto.queries)} queries, {len(proto.database)} database); device {device}")

    source = _Source(cfg, all_photos, progress, cache_root)
    labels = data.Labels.of(train_photos)
    fine, coarse, package = labels.fine, labels.coarse, labels.package
    if pseudo:
        ids = np.array([c for _, c in pseudo], np.int64)
        fine = np.concatenate([fine, labels.n_fine + np.unique(ids, return_inverse=True)[1]])
        unknown = np.full(len(pseudo), -100, np.int64)  # cross-entropy's ignore_index
        coarse, package = np.concatenate([coarse, unknown]), np.concatenate([package, unknown])
        progress(f"[{cfg.name}] + {len(pseudo)} unlabelled photos in {len(np.unique(ids))} mined clusters")
    train_idx = np.array([source.index[p.path] for p in (*train_photos, *pseudo_photos)])

    seed_everything(cfg.seed)  # again: building a missing cache draws random numbers (its throwaway projection)
    model = tmodel.make_model(cfg.model).to(device)
    if cfg.cache and cfg.crop and tmodel.has_stride2(model.backbone, source.start):
        raise ValueError(f"crop augmentation of cached maps needs stride-1 units after unit {source.start}")
    backbone_params = tmodel.set_trainable(model, cfg.model.train_from, cfg.model.freeze_bn)
    if model.head is not None and cfg.model.whitening_init.startswith("pca"):
        desc = pooled_descriptors(model, source, device)[train_idx]
        tmodel.init_whitening(model.head, desc, whiten=cfg.model.whitening_init == "pca")
    elif model.head is not None and cfg.model.whitening_init == "identity":
        tmodel.init_identity(model.head)
    dim = cfg.model.dim or backbones.SPECS[cfg.model.arch].dim
    loss_fn = losses.make_loss(cfg.loss, dim, int(fine.max()) + 1,
                               {"coarse": labels.n_coarse, "package": labels.n_package}).to(device)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone_params, "lr": cfg.backbone_lr},
              {"params": head_params + list(loss_fn.parameters()), "lr": cfg.lr}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    steps = cfg.steps_per_epoch or max(1, len(train_idx) // (cfg.p * cfg.k))
    epochs, head_epochs = cfg.epochs, cfg.head_epochs
    if smoke:
        steps, epochs, head_epochs = SMOKE_STEPS, min(epochs, 1), min(head_epochs, 1)
    if head_epochs and model.head is None:
        raise ValueError("head_epochs needs a projection (model.dim > 0)")
    rng = torch.Generator().manual_seed(cfg.seed)
    npr = np.random.default_rng(cfg.seed)
    attrs = {"coarse": torch.from_numpy(coarse), "package": torch.from_numpy(package)}
    fine_t = torch.from_numpy(fine)
    fixed = next(iter(data.PKSampler(fine, cfg.p, cfg.k, seed=cfg.seed + 1, steps=1)))

    def batch_loss(emb: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        return loss_fn(emb, fine_t[b].to(device), attributes={k: v[b].to(device) for k, v in attrs.items()})

    @torch.no_grad()
    def fixed_batch_loss() -> float:
        """The loss on one fixed batch, without augmentation, in eval mode: comparable across epochs."""
        model.eval()
        loss_fn.eval()
        return float(batch_loss(source.embed(model, source.batch(train_idx[fixed], None, None, False), device), fixed))

    history: list[dict] = []
    t_eval = time.perf_counter()
    m0 = holdout_metrics(model, source, proto, device)
    eval_s = time.perf_counter() - t_eval
    history.append({"epoch": 0, "stage": "start", "holdout": m0, "fixed_batch_loss": fixed_batch_loss()})
    progress(f"[{cfg.name}] epoch 0 (before training): {proto.name} mAP {m0['mAP']:.3f} R@1 {m0['recall@1']:.3f}")
    best = {"mAP": -1.0, "epoch": 0}
    n_epochs = head_epochs + epochs
    mining_meta = ({**cfg.mining, "pseudo_photos": len(pseudo), "clusters": len({c for _, c in pseudo})}
                   if pseudo else None)
    t0 = time.perf_counter()

    def end_epoch(epoch: int, stage: str, loss_sum: float, n: int, evaluate: bool, eta: float,
                  metrics: Callable[[], dict] | None = None) -> None:
        rec = {"epoch": epoch, "stage": stage, "loss": loss_sum / max(n, 1), "seconds": round(time.perf_counter() - t0, 1)}
        if evaluate:
            rec["fixed_batch_loss"] = fixed_batch_loss()
            rec["holdout"] = metrics() if metrics else holdout_metrics(model, source, proto, device)
        history.append(rec)
        msg = f"[{cfg.name}] {stage} epoch {epoch}/{n_epochs} loss {rec['loss']:.4f}"
        if evaluate:
            msg += f" {proto.name} mAP {rec['holdout']['mAP']:.3f} R@1 {rec['holdout']['recall@1']:.3f}"
            meta = make_meta(cfg, model, train_photos, proto, rec["holdout"], epoch, {"mining": mining_meta})
            save_checkpoint(out / "last.pt", model, meta)
            if rec["holdout"]["mAP"] > best["mAP"]:
                best.update(mAP=rec["holdout"]["mAP"], epoch=epoch)
                save_checkpoint(out / "best.pt", model, meta)
        if evaluate or stage != "head":  # head epochs take a second each: report them with the evaluations
            progress(msg + f" ({time.perf_counter() - t0:.0f}s, ETA {eta:.0f}s)")

    # Stage 1 (optional): the projection alone on pooled descriptors of the frozen network (a linear
    # probe; seconds). Fine-tuning after a probed head keeps more of the pretrained features (LP-FT).
    if head_epochs:
        desc = torch.from_numpy(pooled_descriptors(model, source, device)).to(device)
        head_params = list(model.head.parameters()) + list(loss_fn.parameters())
        hopt = torch.optim.AdamW(head_params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
        hsampler = data.PKSampler(fine, cfg.p, cfg.k, seed=cfg.seed, steps=steps)
        total, step = head_epochs * steps, 0
        every = max(1, cfg.head_eval_every) if not smoke else 1

        @torch.no_grad()
        def desc_metrics() -> dict:
            from visearch.evaluation.harness import evaluate_embeddings

            model.eval()
            emb = F.normalize(model.head(desc), dim=1).cpu().numpy()
            q = emb[[source.index[p.path] for p in proto.queries]]
            db = emb[[source.index[p.path] for p in proto.database]]
            m = evaluate_embeddings(proto, q, db)
            return {k: m[k] for k in ("mAP", "mAP@20", "recall@1", "recall@5", "recall@10", "n_queries")}

        for epoch in range(1, head_epochs + 1):
            model.head.train()
            loss_fn.train()
            loss_sum, n = 0.0, 0
            for b in hsampler:
                for g in hopt.param_groups:
                    g["lr"] = cfg.head_lr * lr_factor(step, total, cfg.warmup_steps)
                loss = batch_loss(F.normalize(model.head(desc[train_idx[b]]), dim=1), b)
                hopt.zero_grad(set_to_none=True)
                loss.backward()
                hopt.step()
                loss_sum, n, step = loss_sum + float(loss.detach()), n + 1, step + 1
            el = time.perf_counter() - t0
            end_epoch(epoch, "head", loss_sum, n, epoch % every == 0 or epoch == head_epochs,
                      el / step * (total - step), desc_metrics)

    # Stage 2: the top units, pooling, projection and loss parameters together.
    sampler = data.PKSampler(fine, cfg.p, cfg.k, seed=cfg.seed + 2, steps=steps)
    total, step = epochs * steps, 0
    t1 = time.perf_counter()
    train_s, done, stopped, epoch, planned_epochs = 0.0, 0, None, head_epochs, epochs
    try:
        while done < epochs:
            epoch = head_epochs + done + 1
            tmodel.train_mode(model, cfg.model.train_from, cfg.model.freeze_bn)
            loss_fn.train()
            loss_sum, n = 0.0, 0
            t_epoch = time.perf_counter()
            for b in sampler:
                f = lr_factor(step, total, cfg.warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                emb = source.embed(model, source.batch(train_idx[b], rng, npr, True), device)
                loss = batch_loss(emb, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum, n, step = loss_sum + float(loss.detach()), n + 1, step + 1
            train_s, done = train_s + time.perf_counter() - t_epoch, done + 1
            if budget and done < epochs:
                fit = epochs_within(budget, time.perf_counter() - t_start, train_s / done, eval_s, cfg.eval_every,
                                    done, epochs)
                if fit < epochs:
                    progress(f"[{cfg.name}] budget {budget:.0f}s: {fit} of {epochs} fine-tuning epochs fit at "
                             f"{train_s / done:.1f}s an epoch and {eval_s:.1f}s an evaluation; the schedule now ends "
                             "there")
                    epochs, n_epochs = fit, head_epochs + fit
                    total = epochs * steps
            el = time.perf_counter() - t1
            end_epoch(epoch, "fine-tune", loss_sum, n, done % cfg.eval_every == 0 or done == epochs,
                      el / step * (total - step))
    except KeyboardInterrupt:
        if best["epoch"] == 0:  # nothing evaluated and saved by this run yet
            raise
        stopped = epoch
        progress(f"[{cfg.name}] interrupted in epoch {stopped}: best.pt is epoch {best['epoch']}'s")
    best_map, best_epoch = best["mAP"], best["epoch"]
    seconds = time.perf_counter() - t_start
    planned = {"planned_epochs": planned_epochs, "epochs_run": done, "budget_s": budget, "interrupted_in_epoch": stopped}
    (out / "history.json").write_text(json.dumps({"config": cfg.to_dict(), "history": history, "best_epoch": best_epoch,
                                                  "seconds": round(seconds, 1), **planned}, indent=2) + "\n")
    try:
        plot_history(history, out / "loss.png", f"{cfg.name}: {cfg.loss['name']}, best epoch {best_epoch}")
    except ImportError:
        progress("matplotlib not installed: no loss.png (pip install matplotlib)")
    _, meta = load_checkpoint(out / "best.pt")
    progress(f"[{cfg.name}] best epoch {best_epoch}: {proto.name} mAP {best_map:.3f}; {seconds:.0f}s in all -> {out / 'best.pt'}")
    return Run(out, out / "best.pt", history, meta, seconds, done, stopped)
