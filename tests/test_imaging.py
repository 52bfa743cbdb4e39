"""Decoding: real images decode the same way everywhere; bad bytes get a reason, never a crash."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from visearch.imaging import ImageError, ImageLimits, crop, decode_image, image_size, to_model_input


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def photo(grocery) -> bytes:
    return grocery["val"][0].path.read_bytes()


def test_real_photo_decodes_to_rgb(photo):
    img = decode_image(photo)
    assert img.mode == "RGB" and min(img.size) > 100


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions (a pixel bomb) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, reason", [
    (b"", "zero bytes"),
    (b"this is plainly not an image" * 10, "no recognised image format"),
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "no recognised image format"),
    (png_header_only(100_000, 100_000), "decompression bomb"),
    (png_header_only(8_000, 8_000), "64000000 pixels, over the limit"),
    (encode(Image.new("RGB", (1, 1)), "PNG"), "smaller than"),
])
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_refused(photo):
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(photo[: len(photo) // 2])


def test_byte_limit():
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        decode_image(encode(Image.fromarray(noise), "PNG"), ImageLimits(max_bytes=100))


def test_format_allow_list():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageError):
        decode_image(eps)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_modes_become_rgb(mode):
    base = Image.new("RGB", (40, 30), (200, 10, 10))
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
        fmt = "PNG"
    else:
        img = base.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert decode_image(encode(img, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(data).getpixel((3, 3))
    assert r > 200 and b < 50


def test_exif_orientation_applied():
    img = Image.new("RGB", (60, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def test_crop_and_model_input():
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    c = crop(img, (10, 5, 60, 45))
    assert c.size == (50, 40)
    with pytest.raises(ImageError, match="empty"):
        crop(img, (200, 5, 300, 45))
    arr = to_model_input(c, 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (10, 20, 30)


def test_draft_scale_decodes_a_large_jpeg_reduced_and_each_image_once(photo, monkeypatch):
    from visearch import embedding_model as emb
    from visearch import imaging

    img = Image.open(io.BytesIO(photo))
    w, h = img.size
    out = io.BytesIO()
    img.resize((8 * w, 8 * h)).save(out, "JPEG", quality=90)
    big = out.getvalue()
    small, scale = imaging.decode_image_scaled(big, draft_scale=1 / 8)
    assert scale == 8 and small.size == (w, h)
    assert imaging.decode_image_scaled(big, draft_scale=0.3)[1] == 2  # never below what was asked
    assert imaging.decode_image_scaled(big)[1] == 1
    # Needs: twice the model size on the crop's short side, never above full resolution.
    assert emb.needed_scale(None, 8 * w, 8 * h, 32) == pytest.approx(64 / min(8 * w, 8 * h))
    assert emb.needed_scale((0, 0, 40, 40), 8 * w, 8 * h, 32) == 1.0
    calls = []
    real = imaging.decode_image_scaled
    monkeypatch.setattr(imaging, "decode_image_scaled", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = emb.prepare_all([(big, None), (big, (0, 0, 4 * w, 4 * h)), (photo, None)], 32)
    assert len(calls) == 2, "one decode per distinct image"
    assert calls[0]["draft_scale"] == pytest.approx(64 / min(4 * w, 4 * h))  # what the box needs, not the frame
    assert got[0][1] == (0.0, 0.0, 8.0 * w, 8.0 * h) and got[1][1] == (0, 0, 4 * w, 4 * h)
    assert all(x.shape == (32, 32, 3) for x, _ in got)


def test_image_size_reads_the_header_only_and_checks_the_limits_first():
    """The worker checks each image with `image_size`: a PNG is not decoded for it (its pixels may be
    cut off and the size still reads), and a picture over the limits is refused from its header."""
    rng = np.random.default_rng(0)
    png = encode(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)), "PNG")
    assert image_size(png[: len(png) // 2]) == (640, 480)
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="outside the accepted sizes"):
        image_size(png, ImageLimits(max_pixels=640 * 480 - 1))
    rotated = Image.Exif()
    rotated[0x0112] = 6
    jpeg = encode(Image.new("RGB", (64, 32)), "JPEG", exif=rotated.tobytes())
    assert image_size(jpeg) == (32, 64) == decode_image(jpeg).size


def test_model_input_from_any_size_and_mode():
    """Shrunk by whole factors first, then bilinear: any size and mode gives [S, S, 3] uint8, and a
    flat picture stays flat (no ringing, no shift)."""
    for size, mode in (((2000, 1500), "RGB"), ((100, 50), "L"), ((321, 9), "RGBA"), ((320, 320), "RGB"),
                       ((961, 640), "RGB")):
        out = to_model_input(Image.new(mode, size, 120 if mode == "L" else (120, 60, 30, 255)[:len(mode)]), 320)
        assert out.shape == (320, 320, 3) and out.dtype == np.uint8
        assert (out == out[0, 0]).all()
