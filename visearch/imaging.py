"""Image decoding with limits, and the exact preprocessing the served models expect.

Every entry point (gateway, detection, embedding, worker) decodes through
`decode_image`, so a hostile or broken file is refused the same way everywhere
with an `ImageError` whose message a person can act on.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from visearch import files
from visearch.errors import ImageError  # noqa: F401 - imaging.ImageError for its callers

# Formats a catalog photo plausibly comes in; everything else (PDF, EPS, ICNS...)
# is refused before a decoder plugin ever sees the bytes.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})

# Names the preprocessing of `to_model_input`: caches of embeddings key on it, so a change of it
# never reuses descriptors computed the old way.
PREPROCESSING = "decode+reduce+cv2-bilinear"


def preprocessing_tag() -> str:
    """A short name of PREPROCESSING for cache file names."""
    import hashlib

    return hashlib.sha256(PREPROCESSING.encode()).hexdigest()[:8]

# One thread per resize: the services run one forward per core and size their own concurrency.
cv2.setNumThreads(1)

# Truncated files must fail loudly, not decode to half-grey pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = files.MAX_BYTES
    max_pixels: int = 40_000_000
    min_side: int = 8


DEFAULT_LIMITS = ImageLimits()


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an RGB PIL image, EXIF orientation applied.

    `draft_size` lets JPEG decode at a reduced scale (libjpeg DCT scaling) when the
    caller will shrink the picture anyway; the result is never smaller than that.
    """
    return decode_image_scaled(data, limits, draft_size=draft_size)[0]


def decode_image_scaled(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, draft_size: int | None = None,
                        draft_scale: float | None = None) -> tuple[Image.Image, float]:
    """`decode_image`, plus the factor from its pixels to the original image's (1.0 unless drafted).

    `draft_scale` (0..1] asks for at least that fraction of the original size on both sides
    (a JPEG decodes at 1/2, 1/4 or 1/8 when that is still enough), for callers that crop
    a box before shrinking it."""
    if not data:
        raise ImageError("empty image: zero bytes received")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ALLOWED_FORMATS:
                raise ImageError(f"image format {fmt!r} is not accepted (allowed: {', '.join(sorted(ALLOWED_FORMATS))})")
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
            if min(w, h) < limits.min_side:
                raise ImageError(f"image is {w}x{h}, smaller than {limits.min_side} px on a side")
            if getattr(img, "is_animated", False):
                img.seek(0)  # animated GIF/WebP/PNG: the first frame is the picture
            if draft_size and fmt == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            elif draft_scale and draft_scale < 1.0 and fmt == "JPEG":
                img.draft("RGB", (math.ceil(w * draft_scale), math.ceil(h * draft_scale)))
            header_exif = fmt != "PNG" or "exif" in img.info  # as image_size reads it
            img.load()
            scale = w / img.size[0]
            if header_exif:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img), scale
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image: the bytes are in no recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image could not be decoded (truncated or corrupt): {exc}") from None


def image_size(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header: no pixel decode,
    and the size limits checked before anything else is read."""
    if not data:
        raise ImageError("empty image: zero bytes received")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(f"image format {img.format!r} is not accepted (allowed: {', '.join(sorted(ALLOWED_FORMATS))})")
            w, h = img.size
            if w * h > limits.max_pixels or min(w, h) < limits.min_side:
                raise ImageError(f"image is {w}x{h}, outside the accepted sizes")
            # A PNG's EXIF may follow its pixels, and Pillow decodes the whole picture to find it:
            # read it only when the header has it (JPEG, WebP and TIFF keep it there).
            if (img.format != "PNG" or "exif" in img.info) and img.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w  # transposed or rotated by 90 degrees
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image: the bytes are in no recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image header could not be read: {exc}") from None
    return w, h


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        peak = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white, as a catalog page would show it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def crop(img: Image.Image, box: tuple[float, float, float, float] | None) -> Image.Image:
    """Crop to a pixel box (x1, y1, x2, y2), clipped to the image; None keeps the full frame."""
    if box is None:
        return img
    x1, y1, x2, y2 = box
    w, h = img.size
    x1, x2 = max(0, int(round(x1))), min(w, int(round(x2)))
    y1, y2 = max(0, int(round(y1))), min(h, int(round(y2)))
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise ImageError(f"crop box {box} is empty inside a {w}x{h} image")
    return img.crop((x1, y1, x2, y2))


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """The embedder's input: RGB uint8 [size, size, 3], a plain (aspect-changing) bilinear resize.

    Each axis is first shrunk by the whole factor nearest to its scale (a box filter: Pillow's
    `reduce`, so a large picture is averaged, not sampled), which leaves at most 1.5x to go;
    OpenCV's bilinear resize does the rest (about 6x faster than Pillow's on these sizes, and
    within 0.3 grey levels of it on the grocery photos; the protocols' mAP with each is in
    docs/PERFORMANCE.md). Mean/std normalisation happens inside the exported graph, so this is
    the whole client-side contract (see the model's meta.json).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size == (size, size):
        return np.asarray(img, dtype=np.uint8)
    fx, fy = max(1, round(img.width / size)), max(1, round(img.height / size))
    if fx > 1 or fy > 1:
        img = img.reduce((fx, fy))
    return cv2.resize(np.asarray(img, dtype=np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)
