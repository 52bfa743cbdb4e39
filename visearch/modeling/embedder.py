"""The served embedder as a torch module: ImageNet backbone + pooling (+ a head), normalisation in the graph.

`Embedder` is what training fine-tunes (visearch.training.model) and what the build exports
(visearch.modeling.export). Its names and the build's choices (`EmbedderConfig`) are the served
contract, in the torch-free `visearch.models.contract`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from visearch.models.contract import INPUT_FORMAT, INPUT_NAME, OPSET, OUTPUT_NAME, EmbedderConfig

from . import backbones, pooling

# Per-backbone input normalisation on [0,1] RGB. The EfficientNet-Lite weights come
# from TF checkpoints trained on (x-127)/128; their ImageNet top-1 on real photos is
# more confident with it than with the torchvision mean/std.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mobilenet_v2": (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD),
    "efficientnet_lite0": ((127 / 255,) * 3, (128 / 255,) * 3),
    "efficientnet_lite2": ((127 / 255,) * 3, (128 / 255,) * 3),
}


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


def export_onnx(model: Embedder, cfg: EmbedderConfig, path: Path, model_id: str | None = None) -> None:
    """`model` as an ONNX graph at `path` (checked); its doc string names `model_id` (default: cfg.id)."""
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
    proto.doc_string = f"visearch {cfg.name} {model_id or cfg.id}: {INPUT_FORMAT} -> L2-normalised float32"
    onnx.save(proto, str(path))


# --------------------------------------------------------------------------- photos for the checks


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
