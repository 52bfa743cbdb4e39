"""Made-up views of a photo: what a second photo of the same object could look like.

One family of seeded, photometric and geometric changes (a random resized crop, a rotation, a
perspective change, colour, blur, an occluding patch, a smaller scale), used for two things:

- training: `aug<i>` views of each train photo, cached once through the frozen units
  (visearch.training.data.load_input), so the CPU recipe sees more than the photo and its mirror;
- evaluation: the generic protocol G (visearch.evaluation.generic) makes query views of registry
  photos with a different strength and different seeds.

Torch-free (PIL + numpy): serving never needs it, the evaluation can run without the train extra.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


@dataclass(frozen=True)
class ViewParams:
    """How far a made-up view may move from its photo (each change drawn uniformly within these)."""

    crop_scale: tuple[float, float] = (0.35, 1.0)  # area kept by the random resized crop
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    rotate_deg: float = 12.0
    perspective: float = 0.08  # corner displacement, as a fraction of the side
    colour: float = 0.3  # brightness, contrast, saturation factors in [1 - c, 1 + c]
    blur_p: float = 0.3
    blur_radius: float = 1.5
    occlude_p: float = 0.3
    occlude_area: tuple[float, float] = (0.05, 0.2)
    flip_p: float = 0.5
    min_side: float = 0.5  # the view is scaled by a factor in [min_side, 1]


TRAIN_VIEWS = ViewParams()
# Queries of the generic protocol: a little harder than training's and never mirrored (its
# photos have text and handedness), drawn with other seeds.
QUERY_VIEWS = ViewParams(crop_scale=(0.1, 0.5), rotate_deg=15.0, perspective=0.1, flip_p=0.0, min_side=0.35)


def seed_of(*parts: object) -> int:
    """A stable 64-bit seed from any strings/numbers (the same view on every machine)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def random_resized_crop(img: Image.Image, rng: np.random.Generator, scale=(0.35, 1.0), ratio=(0.75, 4 / 3)
                        ) -> Image.Image:
    """A crop covering `scale` of the area with aspect ratio in `ratio` (Inception-style); whole image as fallback."""
    w, h = img.size
    for _ in range(10):
        a = w * h * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x0, y0, x0 + cw, y0 + ch))
    return img


def _perspective(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    """Each corner moved inward by up to `amount` of the side (PIL's 8-coefficient transform)."""
    w, h = img.size
    dst = np.float64([[0, 0], [w, 0], [w, h], [0, h]])
    src = dst + rng.uniform(0, amount, (4, 2)) * np.float64([[w, h], [-w, h], [-w, -h], [w, -h]])
    a = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coeffs = np.linalg.solve(np.float64(a), src.reshape(-1))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BILINEAR)


def made_up_view(img: Image.Image, seed: int, params: ViewParams = TRAIN_VIEWS) -> Image.Image:
    """One seeded view of `img` (RGB in, RGB out; the same seed gives the same pixels)."""
    rng = np.random.default_rng(seed)
    p = params
    img = img.convert("RGB")
    img = random_resized_crop(img, rng, p.crop_scale, p.crop_ratio)
    if p.flip_p and rng.random() < p.flip_p:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    fill = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(0))
    if p.rotate_deg:
        img = img.rotate(float(rng.uniform(-p.rotate_deg, p.rotate_deg)), Image.Resampling.BILINEAR, fillcolor=fill)
    if p.perspective:
        img = _perspective(img, rng, p.perspective)
    if p.colour:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(1 - p.colour, 1 + p.colour)))
    if rng.random() < p.occlude_p:  # a hand, a price tag, a shelf edge: a plain patch over part of it
        w, h = img.size
        a = w * h * rng.uniform(*p.occlude_area)
        r = math.exp(rng.uniform(math.log(0.3), math.log(3.0)))
        ow, oh = min(w, int(math.sqrt(a * r))), min(h, int(math.sqrt(a / r)))
        x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
        ImageDraw.Draw(img).rectangle((x0, y0, x0 + ow, y0 + oh), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    if rng.random() < p.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, p.blur_radius))))
    s = float(rng.uniform(p.min_side, 1.0))
    if s < 0.99:
        img = img.resize((max(8, round(img.size[0] * s)), max(8, round(img.size[1] * s))), Image.Resampling.BILINEAR)
    return img
