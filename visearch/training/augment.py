"""Image-level augmentation for the full fine-tuning (GPU) recipe: random resized crop, colour jitter, mirror,
or, with `made_up` (a probability), a fresh made-up view (visearch.views.made_up_view: crop, mirror,
rotation, perspective, colour, blur, an occluding patch, a smaller scale), drawn each step where the
CPU recipe caches six of them once (configs/gpu-views.json against configs/default.json).

The output is the served model's input (uint8 RGB [S, S, 3], plain resize), so training
sees exactly the preprocessing of `visearch.imaging.to_model_input` plus the random changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from visearch.imaging import decode_image, to_model_input
from visearch.views import TRAIN_VIEWS, made_up_view, random_resized_crop


def jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def augmented_input(path: Path, size: int, rng: np.random.Generator, params: dict) -> np.ndarray:
    img = decode_image(Path(path).read_bytes())
    if params.get("made_up", 0) and rng.random() < float(params["made_up"]):
        return to_model_input(made_up_view(img, int(rng.integers(0, 2**63)), TRAIN_VIEWS), size)
    img = random_resized_crop(img, rng, tuple(params.get("scale", (0.35, 1.0))), tuple(params.get("ratio", (0.75, 4 / 3))))
    if params.get("jitter", 0):
        img = jitter(img, rng, float(params["jitter"]))
    if params.get("flip", True) and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_model_input(img, size)
