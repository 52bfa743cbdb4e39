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
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from visearch.modeling import backbones, build

from .train import load_checkpoint


def export_checkpoint(checkpoint: Path, repo: Path, name: str = "embedder", version: int = 1,
                      progress: Callable[[str], None] = print, write_config: bool = False,
                      tolerance: float = build.PARITY_TOL) -> dict:
    """Export `checkpoint` as `<repo>/<name>/<version>`; returns the meta record written."""
    t0 = time.perf_counter()
    model, tmeta = load_checkpoint(Path(checkpoint))
    mc = tmeta["config"]["model"]
    cfg = build.EmbedderConfig(arch=mc["arch"], pooling=mc["pooling"], size=mc["size"], gem_p=mc["gem_p"],
                               rmac_levels=mc["rmac_levels"], name=name, version=version)
    dim = int(tmeta["dim"])
    regions = build.attach_regions(model, cfg.size)
    model_dir = Path(repo) / name
    config_path = model_dir / "config.pbtxt"
    if write_config or not config_path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(build.render_config(cfg, dim, regions), encoding="utf-8")
        progress(f"wrote {config_path}")
    build.check_config(config_path, cfg, dim, regions)

    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    tmp = version_dir / f".model.onnx.tmp{os.getpid()}"
    try:
        build.export_onnx(model, cfg, tmp)
        batch, source = build.sample_images(cfg.size)
        diff = build.check_parity(model, tmp, batch)
        if not diff < tolerance:
            raise RuntimeError(f"ONNX Runtime differs from torch by {diff:.2e} (> {tolerance}) on {source}")
        proto = onnx.load(str(tmp))
        proto.doc_string = f"visearch {name} {tmeta['id']}: {build.INPUT_FORMAT} -> L2-normalised float32"
        onnx.save(proto, str(tmp))
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    progress(f"{name}/{version}: {tmeta['id']}, parity max|torch-onnx| = {diff:.1e} on {len(batch)} {source}")

    wfile = backbones.weights_path(cfg.arch)
    meta = {
        "name": name,
        "version": version,
        "id": tmeta["id"],
        "architecture": cfg.arch,
        "weights_package": backbones.SPECS[cfg.arch].package,
        "weights_file": wfile.name,
        "weights_sha256": backbones.sha256_file(wfile),
        "fine_tuned": True,
        "pooling": cfg.pooling,
        "pooling_params": model.pool.params(),
        "whitening": tmeta.get("whitening"),
        "regions": regions,
        "input_name": build.INPUT_NAME,
        "input_dtype": "uint8",
        "input_shape": [-1, cfg.size, cfg.size, 3],
        "input_size": cfg.size,
        "input_format": build.INPUT_FORMAT,
        "mean": tmeta["mean"],
        "std": tmeta["std"],
        "output_name": build.OUTPUT_NAME,
        "output_dtype": "float32",
        "dim": dim,
        "metric": "ip",
        "normalized": True,
        "max_batch_size": build.MAX_BATCH,
        "opset": build.OPSET,
        "model_file": onnx_path.name,
        "model_sha256": backbones.sha256_file(onnx_path),
        "parity_max_abs_diff": float(f"{diff:.3g}"),
        "training": {k: tmeta.get(k) for k in ("loss", "seed", "epoch", "train_split", "holdout_metrics", "mining")},
        "training_config": tmeta["config"],
        "checkpoint_sha256": backbones.sha256_file(Path(checkpoint)),
        "torch_version": str(torch.__version__),
        "onnx_version": onnx.__version__,
    }
    meta_tmp = version_dir / f".meta.json.tmp{os.getpid()}"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(meta_tmp, version_dir / "meta.json")
    progress(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and meta.json in {time.perf_counter() - t0:.1f}s")
    return meta


def next_version(repo: Path, name: str) -> int:
    present = [int(p.name) for p in (Path(repo) / name).glob("[0-9]*") if p.name.isdigit() and (p / "model.onnx").is_file()]
    return max(present, default=0) + 1


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
    ap.add_argument("--tolerance", type=float, default=build.PARITY_TOL, help="max |torch - onnxruntime| allowed")
    args = ap.parse_args(argv)
    if args.version is None:
        args.version = next_version(args.repo, args.name)
    try:
        meta = export_checkpoint(args.checkpoint, args.repo, args.name, args.version,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True),
                                 write_config=args.write_config, tolerance=args.tolerance)
    except (build.ConfigMismatch, ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: meta[k] for k in ("name", "version", "id", "dim", "model_sha256", "parity_max_abs_diff")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
