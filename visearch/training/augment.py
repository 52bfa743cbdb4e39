"""Image-level augmentation for the full fine-tuning (GPU) recipe: random resized crop, colour jitter, mirror.

The output is the served model's input (uint8 RGB [S, S, 3], plain resize), so training
sees exactly the preprocessing of `visearch.imaging.to_model_input` plus the random changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from visearch.imaging import decode_image, to_model_input
from visearch.views import random_resized_crop


def jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def augmented_input(path: Path, size: int, rng: np.random.Generator, params: dict) -> np.ndarray:
    img = decode_image(Path(path).read_bytes())
    img = random_resized_crop(img, rng, tuple(params.get("scale", (0.35, 1.0))), tuple(params.get("ratio", (0.75, 4 / 3))))
    if params.get("jitter", 0):
        img = jitter(img, rng, float(params["jitter"]))
    if params.get("flip", True) and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_model_input(img, size)
