"""Object detection on the serving side: preprocessing, NMS and coordinates, in numpy (no torch).

    det = Detector(backend)                        # the `detector` model of the repository
    found = await det.detect([img, ...])           # per image: [Box(x1, y1, x2, y2, score, label)], best first

The served graph (`visearch/modeling/ssd.py`, exported by `visearch models build`) takes
uint8 RGB [N, S, S, 3] and returns every anchor's decoded box (`boxes`, x1 y1 x2 y2 in
0..1 of the model input) and per-class sigmoid scores (`scores`, column 0 = background).
Everything after that happens here, vectorised: the best non-background class per
anchor, a score threshold, greedy NMS (class-agnostic by default: one box per object
of interest, whatever COCO thinks it is), and the mapping back to the original image's
pixels. The image is either stretched to S x S (how SSD was trained, the default) or
letterboxed (aspect kept, padded grey); both map back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

MODEL = "detector"
RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass(frozen=True)
class Frame:
    """How an image was fitted into the model input: input pixel = original * scale + pad."""

    size: int  # the model input's side
    width: int
    height: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0


def prepare(img: Image.Image, size: int, mode: str = "stretch", source_size: tuple[int, int] | None = None
            ) -> tuple[np.ndarray, Frame]:
    """RGB uint8 [size, size, 3] for the detector, and the frame that maps its boxes back to the
    original image (`source_size`: its width and height when `img` was decoded smaller)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    ow, oh = source_size or (w, h)
    if mode == "stretch":
        out = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0) if img.size != (size, size) else img
        return np.asarray(out, dtype=np.uint8), Frame(size, ow, oh, size / ow, size / oh)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas.paste(img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0), (px, py))
    return np.asarray(canvas, dtype=np.uint8), Frame(size, ow, oh, nw / ow, nh / oh, px, py)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n, 4] and b [m, 4] (x1 y1 x2 y2) -> [n, m]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int = 100, groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first.

    With `groups` (e.g. class ids) boxes only suppress boxes of their own group (per-class
    NMS, done in one pass by moving each group to its own far-apart coordinate range).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64)
    if groups is not None:
        boxes = boxes + (np.asarray(groups, dtype=np.float64) * (np.abs(boxes).max() + 1.0) * 4.0)[:, None]
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        overlap = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(boxes: np.ndarray, scores: np.ndarray, frame: Frame, labels: list[str], *, min_score: float = 0.3,
                iou: float = 0.5, limit: int = 10, per_class: bool = False, min_side: float = 8.0) -> list[Box]:
    """One image's anchors (boxes [A, 4] in 0..1 of the input, scores [A, C]) -> boxes in original pixels."""
    if scores.shape[1] > 1:
        cls = scores[:, 1:].argmax(axis=1) + 1
        best = scores[np.arange(len(scores)), cls]
    else:
        cls, best = np.ones(len(scores), dtype=np.int64), scores[:, 0]
    pick = np.flatnonzero(best >= min_score)
    if per_class:  # one candidate per (anchor, class) above the threshold, as the original graph does
        a, c = np.nonzero(scores[:, 1:] >= min_score)
        pick, cls_pick, best_pick = a, c + 1, scores[a, c + 1]
    else:
        cls_pick, best_pick = cls[pick], best[pick]
    cand = boxes[pick].astype(np.float64)
    if min_side > 0 and len(cand):  # drop boxes too small in original pixels before NMS, not after it
        big = ((cand[:, 2] - cand[:, 0]) * frame.size / frame.scale_x >= min_side) & \
              ((cand[:, 3] - cand[:, 1]) * frame.size / frame.scale_y >= min_side)
        cand, cls_pick, best_pick = cand[big], cls_pick[big], best_pick[big]
    if len(cand) > 4096:  # bound NMS work on a pathological image
        top = np.argsort(-best_pick)[:4096]
        cand, cls_pick, best_pick = cand[top], cls_pick[top], best_pick[top]
    keep = nms(cand, best_pick, iou, limit, cls_pick if per_class else None)
    out = []
    for k in keep:
        x1, y1, x2, y2 = to_pixels(cand[k], frame)
        if x2 - x1 < min_side or y2 - y1 < min_side:
            continue
        label = labels[cls_pick[k]] if cls_pick[k] < len(labels) else str(int(cls_pick[k]))
        out.append(Box(x1, y1, x2, y2, float(best_pick[k]), label))
    return out


def to_pixels(box: np.ndarray, frame: Frame) -> tuple[float, float, float, float]:
    """A box in 0..1 of the model input -> pixels of the original image, clipped to it."""
    x1, y1, x2, y2 = (np.asarray(box, dtype=np.float64) * frame.size).tolist()
    fx = lambda v: min(max((v - frame.pad_x) / frame.scale_x, 0.0), float(frame.width))  # noqa: E731
    fy = lambda v: min(max((v - frame.pad_y) / frame.scale_y, 0.0), float(frame.height))  # noqa: E731
    return fx(x1), fy(y1), fx(x2), fy(y2)


class Detector:
    """The served detector behind any `InferenceBackend` (ONNX Runtime embedded, Triton in production)."""

    def __init__(self, backend, model: str = MODEL, resize: str = "stretch"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize mode {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        self.backend, self.model, self.resize = backend, model, resize

    async def meta(self):
        return await self.backend.metadata(self.model)

    async def labels(self) -> list[str]:
        return list((await self.meta()).extra.get("labels") or [])

    async def detect(self, images: list[Image.Image], *, min_score: float = 0.3, iou: float = 0.5, limit: int = 10,
                     per_class: bool = False, sizes: list[tuple[int, int]] | None = None) -> list[list[Box]]:
        """Boxes in pixels of the original images (`sizes`: their width and height, when the images
        given were decoded smaller)."""
        meta = await self.meta()
        labels = list(meta.extra.get("labels") or [])
        prepared = [prepare(img, meta.input_size, self.resize, sz)
                    for img, sz in zip(images, sizes or [None] * len(images), strict=True)]
        batch = np.stack([p[0] for p in prepared])
        out = await self.backend.infer(self.model, {meta.input_name: batch}, ["boxes", "scores"])
        return [postprocess(out["boxes"][i], out["scores"][i], frame, labels, min_score=min_score, iou=iou,
                            limit=limit, per_class=per_class)
                for i, (_, frame) in enumerate(prepared)]
