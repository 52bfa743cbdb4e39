"""Synthetic detection scenes: real products pasted into real shop photos, with exact boxes.

    composites = build_composites(root, out_dir, "train", n=5000, seed=0)   # Composite(path, boxes)
    ap = average_precision([(boxes, scores), ...], [truth_boxes, ...])        # class-agnostic box AP

Training and evaluation data for a class-agnostic "object of interest" detector (find
the product in a phone photo before embedding it), where the grocery dataset has no
boxes. Protocol:

- A scene is a real shop photo of fruit or vegetables (a non-product photo, a random
  crop of 70-100 % of its side, flipped half the time) resized to `size` x `size`, with
  1-3 objects pasted into it. Each object is scaled so its longer side is 15-55 % of the
  scene's side, rotated by up to +-15 degrees, jittered in brightness and contrast,
  sometimes blurred, and placed at random with up to ~20 % of it outside the frame.
  Later objects may hide parts of earlier ones; a box is the exact tight box of the
  object's still-visible pixels, and an object with under 40 % of its pasted area
  visible loses its box (placements are re-drawn a few times to avoid that).
- "train": backgrounds are train non-product photos; objects are train product photos
  (the whole rectangle, or a random crop of 70-100 % of each side) and, 30 % of the
  time, one of the 81 iconic studio images cut out with `iconic_mask`.
- "val" (held aside, nothing shared with "train"): backgrounds are val non-product
  photos; objects are val product photos, whole rectangles. The iconic images are
  train-side only.
- Deterministic for (split, n, seed, size); written once as JPEG (quality 92) with a
  `composites.json` manifest under `out_dir`, reloaded while the manifest matches.

`average_precision` is VOC/COCO-style box AP with all-point interpolation (the area
under the monotone envelope of the precision/recall curve, as in VOC 2010+).
Torch-free: numpy and PIL only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from visearch import datasets
from visearch.detector import box_iou  # noqa: F401 - part of this module's API (box AP)

COMPOSITE_SIZE = 300
SCALE = (0.15, 0.55)  # object's longer side, fraction of the scene's side
MAX_ROTATION = 15.0  # degrees, either way
MAX_CUT = 0.20  # at most this fraction of an object's rectangle outside the frame
MIN_VISIBLE = 0.40  # an object keeps its box only with this fraction of its pasted area visible
BLUR_PROBABILITY = 0.3
BLUR_RADIUS = (0.5, 1.5)
BRIGHTNESS = (0.75, 1.25)
CONTRAST = (0.75, 1.25)
OBJECTS_PER_SCENE = (1, 3)
CROP = (0.70, 1.0)  # random crop of a product photo / background, fraction of each side
ICONIC_SHARE = 0.3  # chance that a train object is an iconic cut-out rather than a product photo
NEAR_WHITE = 250  # iconic background: every channel at least this (white print on packages is ~240)
PLACEMENT_TRIES = 10
JPEG_QUALITY = 92


@dataclass(frozen=True)
class Composite:
    path: Path
    boxes: tuple[tuple[float, float, float, float], ...]  # x1, y1, x2, y2 in pixels of the image


@dataclass(frozen=True)
class Placement:
    """A fixed draw for one object (instead of random): top-left corner of the rotated, scaled object."""

    x: int
    y: int
    side: float  # longer side of the (unrotated) object, pixels
    angle: float = 0.0  # degrees, counter-clockwise
    blur: float = 0.0  # Gaussian radius, 0 = none
    brightness: float = 1.0
    contrast: float = 1.0


# --- iconic cut-outs ---------------------------------------------------------------------------


def iconic_mask(img: Image.Image, near_white: int = NEAR_WHITE) -> np.ndarray:
    """Foreground of a studio image on a near-white background: all but the near-white pixels reachable from the border.

    Holes (white print on a package) stay foreground because they do not touch the border.
    All-True when the result is degenerate (under 5 % of the pixels).
    """
    a = np.asarray(img.convert("RGB"))
    white = a.min(axis=2) >= near_white
    mask = ~_border_connected(white)
    return mask if mask.mean() >= 0.05 else np.ones_like(mask)


def _border_connected(free: np.ndarray) -> np.ndarray:
    """Pixels of `free` 4-connected to the image border through `free` (a flood fill, no scipy)."""
    reached = np.zeros_like(free)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = free[edge]
    count = -1
    while count != (count := int(reached.sum())):
        reached = _spread_runs(free, reached)
        reached = _spread_runs(free.T, reached.T).T
    return reached


def _spread_runs(free: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Marks every horizontal run of `free` pixels that holds a reached pixel as reached."""
    starts = free.copy()
    starts[:, 1:] &= ~free[:, :-1]
    labels = np.cumsum(starts.ravel()).reshape(free.shape) * free
    hit = np.zeros(int(labels.max()) + 1, dtype=bool)
    hit[labels[reached & free]] = True
    hit[0] = False
    return hit[labels]


# --- one composite -----------------------------------------------------------------------------


def make_composite(
    rng: np.random.Generator,
    background: Image.Image,
    objects: Sequence[tuple[Image.Image, np.ndarray | None]],
    size: int = COMPOSITE_SIZE,
    *,
    scale: tuple[float, float] = SCALE,
    max_rotation: float = MAX_ROTATION,
    max_cut: float = MAX_CUT,
    min_visible: float = MIN_VISIBLE,
    blur_probability: float = BLUR_PROBABILITY,
    placements: Sequence[Placement] | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Pastes `objects` (RGB image, bool mask or None for the whole rectangle) in order into `background`.

    Returns the size x size RGB scene and the [k, 4] float boxes (x1, y1, x2, y2, pixel edges)
    of the objects still visible enough, in paste order: each is the tight box of that
    object's visible pixels. `placements` (one per object) replaces the random draws, for tests.
    """
    if placements is not None and len(placements) != len(objects):
        raise ValueError(f"{len(placements)} placements for {len(objects)} objects")
    canvas = np.array(background.convert("RGB").resize((size, size), Image.BILINEAR))
    owner = np.full((size, size), -1, dtype=np.int32)  # which object shows at each pixel
    areas: list[int] = []
    for i, (img, mask) in enumerate(objects):
        img, mask = _tight(img.convert("RGB"), mask)
        p = placements[i] if placements is not None else _draw(rng, img.size, size, scale, max_rotation, blur_probability)
        pix, alpha = _transform(img, mask, p)
        h, w = alpha.shape
        x, y = p.x, p.y
        if placements is None:
            for _ in range(PLACEMENT_TRIES):
                x, y = _position(rng, w, h, size, max_cut)
                if _keeps_visible(owner, areas, alpha, x, y, min_visible):
                    break
        _paste(canvas, owner, pix, alpha, x, y, i)
        areas.append(int(alpha.sum()))
    boxes = []
    for i, area in enumerate(areas):
        ys, xs = np.nonzero(owner == i)
        if area and len(xs) >= min_visible * area:
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return Image.fromarray(canvas), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _tight(img: Image.Image, mask: np.ndarray | None) -> tuple[Image.Image, np.ndarray]:
    """The object cropped to its mask's box (so its scale is the object's, not the padding's)."""
    if mask is None:
        return img, np.ones((img.height, img.width), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (img.height, img.width):
        raise ValueError(f"mask {mask.shape} does not match image {img.size[::-1]}")
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("empty object mask")
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return img.crop((x1, y1, x2, y2)), mask[y1:y2, x1:x2]


def _draw(rng: np.random.Generator, wh: tuple[int, int], size: int, scale: tuple[float, float],
          max_rotation: float, blur_probability: float) -> Placement:
    side = float(rng.uniform(*scale)) * size
    angle = float(rng.uniform(-max_rotation, max_rotation))
    blur = float(rng.uniform(*BLUR_RADIUS)) if rng.random() < blur_probability else 0.0
    return Placement(0, 0, side, angle, blur, float(rng.uniform(*BRIGHTNESS)), float(rng.uniform(*CONTRAST)))


def _transform(img: Image.Image, mask: np.ndarray, p: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Scale, jitter, blur and rotate one object: its pixels [h, w, 3] and mask [h, w]."""
    k = p.side / max(img.size)
    w, h = max(2, round(img.width * k)), max(2, round(img.height * k))
    img = img.resize((w, h), Image.BILINEAR)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    if p.brightness != 1.0 or p.contrast != 1.0:
        a = np.asarray(img, dtype=np.float32)
        sel = np.asarray(m) > 0
        mean = a[sel].mean(axis=0) if sel.any() else a.reshape(-1, 3).mean(axis=0)
        a = ((a - mean) * p.contrast + mean) * p.brightness
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if p.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(p.blur))
    if p.angle:
        fill = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(axis=0))  # no dark fringe at the edge
        img = img.rotate(p.angle, Image.BILINEAR, expand=True, fillcolor=fill)
        m = m.rotate(p.angle, Image.NEAREST, expand=True, fillcolor=0)
    return np.asarray(img), np.asarray(m) > 0


def _position(rng: np.random.Generator, w: int, h: int, size: int, max_cut: float) -> tuple[int, int]:
    """Top-left corner with at most `max_cut / 2` of each side outside the frame (so under `max_cut` of the area)."""
    def one(extent: int) -> int:
        lo, hi = -int(max_cut / 2 * extent), size - extent + int(max_cut / 2 * extent)
        return int(rng.integers(lo, hi + 1)) if hi >= lo else (size - extent) // 2
    return one(w), one(h)


def _window(shape: tuple[int, int], x: int, y: int, size: int) -> tuple[slice, slice, slice, slice] | None:
    """Matching slices of the scene and of an object at (x, y), or None when it is wholly outside."""
    h, w = shape
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
    if x2 <= x1 or y2 <= y1:
        return None
    return slice(y1, y2), slice(x1, x2), slice(y1 - y, y2 - y), slice(x1 - x, x2 - x)


def _keeps_visible(owner: np.ndarray, areas: list[int], alpha: np.ndarray, x: int, y: int, min_visible: float) -> bool:
    """Whether pasting `alpha` at (x, y) leaves itself and every earlier object visible enough."""
    win = _window(alpha.shape, x, y, owner.shape[0])
    if win is None:
        return False
    sy, sx, oy, ox = win
    a = alpha[oy, ox]
    if a.sum() < min_visible * alpha.sum():
        return False
    counts = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]
    covered = np.bincount(owner[sy, sx][a] + 1, minlength=len(areas) + 1)[1:]
    return all(c - v >= min_visible * area for c, v, area in zip(counts, covered, areas, strict=True) if c >= min_visible * area)


def _paste(canvas: np.ndarray, owner: np.ndarray, pix: np.ndarray, alpha: np.ndarray, x: int, y: int, index: int) -> None:
    win = _window(alpha.shape, x, y, canvas.shape[0])
    if win is None:
        return
    sy, sx, oy, ox = win
    a = alpha[oy, ox]
    canvas[sy, sx][a] = pix[oy, ox][a]
    owner[sy, sx][a] = index


# --- the data set ------------------------------------------------------------------------------


def build_composites(root: Path, out_dir: Path, split: str, n: int, seed: int, size: int = COMPOSITE_SIZE,
                     objects_per_scene: tuple[int, int] = OBJECTS_PER_SCENE) -> list[Composite]:
    """`n` composites of `split` (see the module docstring), written once under `out_dir`."""
    out_dir = Path(out_dir)
    manifest = out_dir / "composites.json"
    key = {"split": split, "n": n, "seed": seed, "size": size, "objects_per_scene": list(objects_per_scene)}
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if {k: saved.get(k) for k in key} == key and all((out_dir / r["file"]).is_file() for r in saved["composites"]):
            return [Composite(out_dir / r["file"], tuple(tuple(b) for b in r["boxes"])) for r in saved["composites"]]
    photos = datasets.grocery_split(root, split)
    backgrounds = [p for p in photos if not p.is_product]
    products = [p for p in photos if p.is_product]
    iconic = datasets.grocery_iconic(root) if split == "train" else []
    masks: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    composites, rows = [], []
    for i in range(n):
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        background = _random_crop(rng, Image.open(bg.path).convert("RGB"))
        if rng.random() < 0.5:
            background = background.transpose(Image.FLIP_LEFT_RIGHT)
        objects, sources = [], []
        for _ in range(int(rng.integers(objects_per_scene[0], objects_per_scene[1] + 1))):
            if iconic and rng.random() < ICONIC_SHARE:
                obj = iconic[int(rng.integers(len(iconic)))]
                img = Image.open(obj.path).convert("RGB")
                if obj.fine_id not in masks:
                    masks[obj.fine_id] = iconic_mask(img)
                objects.append((img, masks[obj.fine_id]))
            else:
                obj = products[int(rng.integers(len(products)))]
                img = Image.open(obj.path).convert("RGB")
                objects.append((_random_crop(rng, img) if split == "train" else img, None))
            sources.append(obj.key)
        scene, boxes = make_composite(rng, background, objects, size)
        name = f"{split}-{i:05d}.jpg"
        scene.save(out_dir / name, quality=JPEG_QUALITY)
        box_rows = [tuple(float(v) for v in b) for b in boxes]
        composites.append(Composite(out_dir / name, tuple(box_rows)))
        rows.append({"file": name, "boxes": box_rows, "background": bg.key, "objects": sources})
    manifest.write_text(json.dumps({**key, "composites": rows}, indent=1))
    return composites


def _random_crop(rng: np.random.Generator, img: Image.Image, fraction: tuple[float, float] = CROP) -> Image.Image:
    """A random crop of `fraction` of each side."""
    w, h = max(1, round(img.width * rng.uniform(*fraction))), max(1, round(img.height * rng.uniform(*fraction)))
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    return img.crop((x, y, x + w, y + h))


# --- box AP ------------------------------------------------------------------------------------


def average_precision(detections: Sequence[tuple[np.ndarray, np.ndarray]], truths: Sequence[np.ndarray],
                      iou: float = 0.5) -> float:
    """Class-agnostic box AP over a data set: one (boxes [k, 4], scores [k]) and one truth [m, 4] per image.

    All detections are ranked by score (ties keep input order); each takes the unmatched truth
    of its image with the highest IoU at least `iou`, else it is a false positive (so duplicates
    are). AP is the all-point area under the monotone non-increasing envelope of the
    precision/recall curve. NaN when there are no truths.
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")
    truths = [np.asarray(t, dtype=np.float64).reshape(-1, 4) for t in truths]
    total = sum(len(t) for t in truths)
    if total == 0:
        return float("nan")
    ranked = []  # (score, image, box)
    for image, (boxes, scores) in enumerate(detections):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"image {image}: {len(boxes)} boxes for {len(scores)} scores")
        ranked += [(s, image, b) for s, b in zip(scores, boxes, strict=True)]
    order = sorted(range(len(ranked)), key=lambda j: -ranked[j][0])  # stable
    matched = [np.zeros(len(t), dtype=bool) for t in truths]
    hits = np.zeros(len(ranked), dtype=bool)
    for rank, j in enumerate(order):
        _, image, box = ranked[j]
        if not len(truths[image]):
            continue
        overlap = np.where(matched[image], -1.0, box_iou(box, truths[image])[0])
        best = int(overlap.argmax())
        if overlap[best] >= iou:
            matched[image][best] = hits[rank] = True
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / total
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate(([0.0], recall)))
    return float((steps * envelope).sum())
