"""Export a training checkpoint into the model repository with the served model's contract.

    visearch export --checkpoint runs/default/best.pt --repo model_repository [--name embedder] [--version N]

Without --version it writes the next free version (serving picks the highest).

Writes `<repo>/<name>/<version>/model.onnx` and `meta.json` (uint8 NHWC `images` in,
L2-normalised `embeddings` out, dynamic batch; docs/MODELS.md), checks ONNX Runtime
against torch on real photos (whole batch and one by one), and checks or writes
`<repo>/<name>/config.pbtxt` (Triton) exactly as `visearch models build` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from visearch.modeling import backbones
from visearch.modeling.export import export_embedder
from visearch.models.contract import PARITY_TOL, EmbedderConfig
from visearch.models.repository import ConfigMismatch, next_version

from .train import load_checkpoint


def export_checkpoint(checkpoint: Path, repo: Path, name: str = "embedder", version: int = 1,
                      progress: Callable[[str], None] = print, write_config: bool = False,
                      tolerance: float = PARITY_TOL, size: int | None = None) -> dict:
    """Export `checkpoint` as `<repo>/<name>/<version>`; returns the meta record written. `size`: the
    served input size, when not the one it trained at (the backbone is convolutional and the pooling
    takes any map, so a model trained at 320 can be served at 384 or 448: docs/TRAINING.md)."""
    model, tmeta = load_checkpoint(Path(checkpoint))
    mc = tmeta["config"]["model"]
    if size is not None and (size % 32 or not 96 <= size <= 1024):
        raise ValueError(f"input size {size}: a multiple of 32 from 96 to 1024")
    cfg = EmbedderConfig(arch=mc["arch"], pooling=mc["pooling"], size=size or mc["size"], gem_p=mc["gem_p"],
                         rmac_levels=mc["rmac_levels"], name=name, version=version)
    fine_tuned = {
        "whitening": tmeta.get("whitening"),
        "training": {k: tmeta.get(k) for k in ("loss", "seed", "epoch", "train_split", "holdout_metrics", "mining")},
        "training_config": tmeta["config"],
        "checkpoint_sha256": backbones.sha256_file(Path(checkpoint)),
    }
    return export_embedder(model, cfg, Path(repo), int(tmeta["dim"]), model_id=tmeta["id"], mean=tmeta["mean"],
                           std=tmeta["std"], fine_tuned=fine_tuned, progress=progress, write_config=write_config,
                           tolerance=tolerance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="visearch export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (runs/NAME/best.pt)")
    ap.add_argument("--repo", type=Path, default=Path("model_repository"), help="model repository folder")
    ap.add_argument("--name", default="embedder", help="model name in the repository")
    ap.add_argument("--version", type=int, default=None,
                    help="version folder to write (default: one above the highest present, so a fine-tuned model "
                         "never silently replaces the vectors' model: serving picks the highest version and catalogs "
                         "embedded by another version refuse to mix)")
    ap.add_argument("--write-config", action="store_true", help="(re)write config.pbtxt from the model")
    ap.add_argument("--tolerance", type=float, default=PARITY_TOL, help="max |torch - onnxruntime| allowed")
    ap.add_argument("--size", type=int, default=None,
                    help="serve at this input size (a multiple of 32) instead of the one the model trained at")
    args = ap.parse_args(argv)
    if args.version is None:
        args.version = next_version(args.repo, args.name)
    try:
        meta = export_checkpoint(args.checkpoint, args.repo, args.name, args.version,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True),
                                 write_config=args.write_config, tolerance=args.tolerance, size=args.size)
    except (ConfigMismatch, ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: meta[k] for k in ("name", "version", "id", "dim", "model_sha256", "parity_max_abs_diff")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
