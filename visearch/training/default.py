"""The served default: the fine-tuned recipe of `configs/default.json`, trained when needed.

    checkpoint = default_checkpoint(progress=print)   # None: no dataset, serve off-the-shelf

`visearch models build` calls this. It reuses `runs/<name>/best.pt` when that checkpoint was
trained by exactly the same config (dict equality on the meta record, names and thread counts aside) from the same backbone
weights; else it writes that checkpoint from the trained parameters that come with the repository
(`params/embedder.npz`, `visearch.training.params`) when they were packed from that recipe and
those weights; and otherwise (or with `retrain`) trains it (about 20 minutes on 2 CPU cores:
frozen-map cache + training, docs/TRAINING.md). Without the grocery dataset there is nothing to train on: it returns None
and the caller builds the off-the-shelf ImageNet model instead, saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from visearch import datasets
from visearch.modeling import backbones

from . import model as tmodel
from . import params as packs
from .data import REPO_ROOT
from .params import PARAMS_DIR, PackError
from .train import TrainConfig, load_checkpoint, load_config, save_checkpoint, train

DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.json"
DEFAULT_RUNS = REPO_ROOT / "runs"
PACK = "embedder.npz"  # under params/: the default recipe's trained parameters (`visearch models pack`)
RUNTIME_KEYS = ("name", "description", "threads", "batch_workers")  # labels and execution, not what a run computes


def _recipe(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def trained_by(meta: dict, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's (or pack's) meta record says `cfg` trained it from the weights installed now."""
    weights = backbones.sha256_file(backbones.weights_path(cfg.model.arch))
    return _recipe(meta.get("config") or {}) == _recipe(cfg.to_dict()) and meta.get("weights_sha256") == weights


def reusable(checkpoint: Path, cfg: TrainConfig) -> bool:
    """Whether `checkpoint` was trained by `cfg` from the backbone weights installed now."""
    if not checkpoint.is_file():
        return False
    try:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply not reusable
        return False
    return trained_by(meta, cfg)


def default_checkpoint(config: Path = DEFAULT_CONFIG, runs: Path = DEFAULT_RUNS,
                       progress: Callable[[str], None] = print, retrain: bool = False,
                       params: Path = PARAMS_DIR) -> Path | None:
    """The checkpoint of the default recipe: reused, unpacked from `params`, or trained (module
    docstring); None without the dataset."""
    cfg = load_config(config)
    if datasets.grocery_root() is None:
        progress(f"no grocery dataset (set {datasets.ENV_VAR}): nothing to fine-tune on")
        return None
    best = runs / cfg.name / "best.pt"
    if not retrain and reusable(best, cfg):
        progress(f"reusing {best}: trained by {config} from the installed weights")
        return best
    if not retrain:
        pack = Path(params) / PACK
        try:
            unpack(pack, cfg, best)
            progress(f"wrote {best} from the trained parameters {pack} (to train them again: "
                     "visearch models build --retrain)")
            return best
        except PackError as exc:
            progress(f"not using the packed parameters: {exc}")
    progress(f"training the default recipe {config} into {best.parent} (docs/TRAINING.md)")
    return train(cfg, best.parent, progress=progress).best


def _bases(model_config: dict) -> tuple[dict[str, torch.Tensor], set[str]]:
    mcfg = tmodel.ModelConfig.from_dict(model_config)
    return packs.bases(lambda: tmodel.make_model(mcfg))


def pack(checkpoint: Path, out: Path) -> tuple[str, int]:
    """Pack a training checkpoint (runs/<name>/best.pt) as `out`; returns (sha256, tensors packed)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    arrays = packs.pack_state(ckpt["state_dict"], *_bases(ckpt["meta"]["config"]["model"]))
    return packs.write_pack(out, arrays, ckpt["meta"]), packs.tensors(arrays)


def unpack(pack_path: Path, cfg: TrainConfig, dest: Path) -> Path:
    """Writes the training checkpoint `dest` from a pack of `cfg`'s recipe; PackError if it is not one."""
    arrays, meta = packs.read_pack(pack_path)
    if not trained_by(meta, cfg):
        raise PackError(f"{pack_path} was trained by another recipe than {cfg.name}'s or from other backbone weights")
    model = tmodel.make_model(tmodel.ModelConfig.from_dict(meta["config"]["model"]))
    # The model's own start is the base: every tensor whose start differs between builds is in the pack.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(packs.unpack_state(arrays, start), strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dest, model.eval(), dict(meta, packed_id=meta.get("id"), unpacked_from=packs.provenance(pack_path)))
    load_checkpoint(dest)  # strict: what was written loads back
    return dest


def pack_pca(embedder_pack: Path, cfg: TrainConfig, out: Path, progress: Callable[[str], None] = print
             ) -> tuple[Path, str]:
    """Pack the served PCA basis for the model a first build exports from `embedder_pack`: unpacks
    it, exports it as a first build does, fits the PCA on the default fit photos and packs that
    basis as `out`/embedder-pca128.npz with that export's descriptors of the reference images
    (visearch.modeling.reduce.pack_reduction: a build takes the basis for any export that gives them
    back, whatever its file's bytes); returns (path, sha256)."""
    import tempfile

    from visearch.modeling.reduce import DEFAULT_DIM, pack_name, pack_reduction, reduce_embedder

    from .export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="visearch-pack-") as tmp:
        checkpoint = unpack(embedder_pack, cfg, Path(tmp) / "best.pt")
        repo = Path(tmp) / "repo"
        export_checkpoint(checkpoint, repo, "embedder", 1, lambda m: None)
        reduce_embedder(repo, "embedder", 1, DEFAULT_DIM, progress=progress)
        dest = Path(out) / pack_name("embedder", DEFAULT_DIM)
        return dest, pack_reduction(repo / "embedder" / "2", dest)
