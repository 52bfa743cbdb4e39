"""The served default: the fine-tuned recipe of `configs/default.json`, trained when needed.

    checkpoint = default_checkpoint(progress=print)   # None: no dataset, serve off-the-shelf

`visearch models build` calls this. It reuses `runs/<name>/best.pt` when that checkpoint was
trained by exactly the same config (dict equality on the meta record, names and thread counts aside) from the same backbone
weights, and otherwise trains it (about 5 minutes on 2 CPU cores: frozen-map cache + training,
docs/TRAINING.md). Without the grocery dataset there is nothing to train on: it returns None
and the caller builds the off-the-shelf ImageNet model instead, saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from visearch import datasets
from visearch.modeling import backbones

from .data import REPO_ROOT
from .train import TrainConfig, load_config, train

DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.json"
DEFAULT_RUNS = REPO_ROOT / "runs"
RUNTIME_KEYS = ("name", "description", "threads", "batch_workers")  # labels and execution, not what a run computes


def _recipe(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def reusable(checkpoint: Path, cfg: TrainConfig) -> bool:
    """Whether `checkpoint` was trained by `cfg` from the backbone weights installed now."""
    if not checkpoint.is_file():
        return False
    try:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply not reusable
        return False
    weights = backbones.sha256_file(backbones.weights_path(cfg.model.arch))
    return _recipe(meta.get("config") or {}) == _recipe(cfg.to_dict()) and meta.get("weights_sha256") == weights


def default_checkpoint(config: Path = DEFAULT_CONFIG, runs: Path = DEFAULT_RUNS,
                       progress: Callable[[str], None] = print, retrain: bool = False) -> Path | None:
    """The checkpoint of the default recipe, trained if missing or stale; None without the dataset."""
    cfg = load_config(config)
    if datasets.grocery_root() is None:
        progress(f"no grocery dataset (set {datasets.ENV_VAR}): nothing to fine-tune on")
        return None
    best = runs / cfg.name / "best.pt"
    if not retrain and reusable(best, cfg):
        progress(f"reusing {best}: trained by {config} from the installed weights")
        return best
    progress(f"training the default recipe {config} into {best.parent} (docs/TRAINING.md)")
    return train(cfg, best.parent, progress=progress).best
