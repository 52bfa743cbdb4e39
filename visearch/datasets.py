"""The Grocery Store dataset (Klasson et al., WACV 2019) as lists of labelled photos.

Layout (see the dataset's DATA.md): `dataset/{train,val}.txt` with lines
`relative/path.jpg, fine_id, coarse_id`, `dataset/classes.csv` with class names
and the iconic (studio) image of each class. Torch-free.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ENV_VAR = "VISEARCH_GROCERY_DIR"
# Fine classes 28..58 are specific packaged products (instance-level ground truth);
# the rest are fruit and vegetables of one kind (category-level distractors).
PRODUCT_FINE_IDS = range(28, 59)


@dataclass(frozen=True)
class Photo:
    path: Path
    fine_id: int
    coarse_id: int
    fine_name: str
    coarse_name: str

    @property
    def is_product(self) -> bool:
        return self.fine_id in PRODUCT_FINE_IDS

    @property
    def key(self) -> str:
        """A stable id: the path relative to the dataset folder."""
        parts = self.path.parts
        return "/".join(parts[parts.index("dataset") + 1:]) if "dataset" in parts else self.path.name


def _is_root(path: Path) -> bool:
    return (path / "dataset" / "classes.csv").is_file()


def grocery_root() -> Path | None:
    """The dataset folder: $VISEARCH_GROCERY_DIR, else `shared/data/grocery-store` above this file or the cwd."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path if _is_root(path) else None
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data" / "grocery-store"
            if _is_root(candidate):
                return candidate
    return None


@dataclass(frozen=True)
class _Class:
    fine_name: str
    coarse_id: int
    coarse_name: str
    iconic: str


@lru_cache(maxsize=8)
def _classes(root: Path) -> dict[int, _Class]:
    out: dict[int, _Class] = {}
    with open(root / "dataset" / "classes.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for row in reader:
            if not row:
                continue
            fine_name, fine_id, coarse_name, coarse_id, iconic = (c.strip() for c in row[:5])
            out[int(fine_id)] = _Class(fine_name, int(coarse_id), coarse_name, iconic.lstrip("/"))
    return out


def grocery_split(root: Path, split: str) -> list[Photo]:
    """Photos of the official "train" or "val" split, in file order."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'val' (the test split is not shipped)")
    classes = _classes(root)
    photos: list[Photo] = []
    with open(root / "dataset" / f"{split}.txt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                raise ValueError(f"{split}.txt line {lineno}: expected 'path, fine_id, coarse_id', got {line!r}")
            rel, fine_id, coarse_id = parts[0], int(parts[1]), int(parts[2])
            cls = classes[fine_id]
            photos.append(Photo(root / "dataset" / rel, fine_id, coarse_id, cls.fine_name, cls.coarse_name))
    return photos


def grocery_iconic(root: Path) -> list[Photo]:
    """The studio ("iconic") image of each class, one per fine class, by fine id."""
    return [
        Photo(root / "dataset" / c.iconic, fine_id, c.coarse_id, c.fine_name, c.coarse_name)
        for fine_id, c in sorted(_classes(root).items())
    ]


STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_HINT = "apt-get install tuxpaint-stamps-default"
STAMPS_BACKGROUND = (128, 128, 128)
STAMPS_MAX_SIDE = 640
STAMPS_MIN_SIDE = 32  # a few stamps are thin rules or dots, not pictures of things


def stamp_photos(cache: Path, stamps: Path = STAMPS_DIR) -> list[Path]:
    """Tux Paint's stamps (Debian's `tuxpaint-stamps-default`: animals, food, vehicles, buildings,
    household things) as RGB JPEG files under `cache`, each flattened onto grey and at most
    STAMPS_MAX_SIDE px: pictures of things that are not groceries, in none of the protocols.

    Written once (the file name is a hash of the stamp's path and size), in sorted order; stamps
    under STAMPS_MIN_SIDE px on a side are left out."""
    import hashlib
    import os

    from PIL import Image

    if not stamps.is_dir():
        raise FileNotFoundError(f"no Tux Paint stamps in {stamps}: {STAMPS_HINT}")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(stamps.rglob("*.png")):
        if "_mirror" in src.stem or src.stem.endswith("_back"):
            continue  # a stamp's mirrored or back variant is the same picture
        key = hashlib.sha256(f"{src.relative_to(stamps)}:{src.stat().st_size}".encode()).hexdigest()[:16]
        dst = cache / f"{key}.jpg"
        if not dst.is_file():
            with Image.open(src) as im:
                if min(im.size) < STAMPS_MIN_SIDE:
                    continue
                rgba = im.convert("RGBA")
            rgba.thumbnail((STAMPS_MAX_SIDE, STAMPS_MAX_SIDE))
            flat = Image.new("RGB", rgba.size, STAMPS_BACKGROUND)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            tmp = dst.with_suffix(f".tmp{os.getpid()}.jpg")
            flat.save(tmp, "JPEG", quality=92)
            os.replace(tmp, dst)
        out.append(dst)
    return out
