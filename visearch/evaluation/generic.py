"""G and GR: generic instance search on photos from the registries, not shop shelves.

A model fine-tuned on 31 grocery products must still find the same building, painting, toy or
scene in someone else's catalog. Two protocols check that, on photos installed from PyPI
(`mvtb-data`, the Machine Vision Toolbox's images; `scikit-image`'s bundled images: the `train`
extra installs both):

- **GR** (real views): instances photographed more than once (a building from three places, the
  Eiffel tower twice, a toy house in nine frames, overlapping aerial photos, a calibration board in
  several poses, a stereo pair ...). The first photo of each is a query; the database holds the
  others plus every single photo below as a distractor.
- **G** (made-up views): every photo above and 40 single photos (paintings, flowers, streets,
  a butterfly, a cat, coffee, coins, ...) is one instance; the database holds each original,
  the queries are two made-up views of each (visearch.views.QUERY_VIEWS: crop, rotation, perspective,
  colour, blur, occlusion, smaller scale; seeds unlike training's). Positives: the originals of the
  same instance.

Nothing here is used to choose a setting: these are held-out checks of generality. The views are
written once as JPEG files under `.data/generic/<version>/` (a version hash of the list, the
parameters and the code's view version), so the feature caches of the evaluation key them by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from visearch.datasets import Photo
from visearch.views import QUERY_VIEWS, made_up_view, seed_of

from .protocol import Protocol

GENERIC_CACHE = Path(__file__).resolve().parents[2] / ".data" / "generic"

VERSION = 1
N_QUERY_VIEWS = 2
MAX_SIDE = 640  # originals are stored at most this large (the catalog side of a search)
ID_BASE = 10_000  # instance ids, far from the grocery fine ids

# (instance, [(package, path inside its data folder)]); the first photo of a multi-photo instance
# is GR's query.
MVTB = "mvtbdata"
SKI = "skimage"
GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("building2", [(MVTB, "images/building2-1.png"), (MVTB, "images/building2-2.png"), (MVTB, "images/building2-3.png")]),
    ("eiffel", [(MVTB, "images/eiffel-1.png"), (MVTB, "images/eiffel-2.png")]),
    ("castle-sign", [(MVTB, "images/castle.png"), (MVTB, "images/castle2.png")]),
    ("rocks", [(MVTB, "images/rocks2-l.png"), (MVTB, "images/rocks2-r.png")]),
    ("walls", [(MVTB, "images/walls-l.png"), (MVTB, "images/walls-r.png")]),
    ("toy-house", [(MVTB, f"images/seq/im.00{i}.png") for i in (1, 3, 5, 7, 9)]),
    ("aerial-grey", [(MVTB, f"images/mosaic/aerial2-00{i}.png") for i in (1, 3, 5, 7, 9)]),
    ("aerial-colour", [(MVTB, f"images/mosaic/aerial-{i:02d}.png") for i in (8, 9, 10)]),
    ("calibration-board", [(MVTB, f"images/calibration/left{i:02d}.jpg") for i in (1, 4, 7, 10, 13)]),
    ("motorcycle", [(SKI, "data/motorcycle_left.png"), (SKI, "data/motorcycle_right.png")]),
]
SINGLES: list[tuple[str, str]] = [
    *((MVTB, f"images/{n}") for n in (
        "58060.png", "Image18.png", "adelson.png", "arucoboard.png", "butterfly.jpg", "church.png", "fisheye_target.png",
        "greenscreen.png", "image3.jpg", "lab-scene.png", "lena.png", "monalisa.png", "notre-dame.png", "parks.png",
        "penguins.png", "road.png", "roof.png", "street.png", "tags.png", "wheres-wally.png",
        *(f"flowers{i}.png" for i in range(1, 10)))),
    *((SKI, f"data/{n}") for n in (
        "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "color.png", "grass.png",
        "gravel.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png", "page.png", "retina.jpg",
        "rocket.jpg", "text.png")),
]
MISSING_HINT = "pip install mvtb-data scikit-image (the train extra has both)"

# GS, for selection only (never reported as a result): OpenCV's sample photos (Debian's
# `opencv-doc`), none of them in G. Pairs of real views: Graffiti and Leuven (viewpoint and light,
# Mikolajczyk's sets), a box alone and in a scene, stereo pairs, two renders of a head.
CV = "opencv-doc"
CV_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
GS_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    (name, [(CV, m) for m in members]) for name, members in (
        ("graffiti", ["graf1.png", "graf3.png"]), ("leuven", ["leuvenA.jpg", "leuvenB.jpg"]),
        ("box", ["box.png", "box_in_scene.png"]), ("aloe", ["aloeL.jpg", "aloeR.jpg"]),
        ("suzanne", ["Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg"]), ("basketball", ["basketball1.png", "basketball2.png"]),
        ("rubberwhale", ["rubberwhale1.png", "rubberwhale2.png"]), ("aero", ["aero1.jpg", "aero3.jpg"]),
        ("ela", ["ela_original.jpg", "ela_modified.jpg"]), ("text-page", ["imageTextN.png", "imageTextR.png"]))
]
GS_SINGLES: list[tuple[str, str]] = [(CV, n) for n in (
    "apple.jpg", "baboon.jpg", "blox.jpg", "board.jpg", "building.jpg", "cards.png", "chicky_512.png", "fruits.jpg",
    "home.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg", "smarties.png",
    "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "sudoku.png", "LinuxLogo.jpg", "WindowsLogo.jpg")]


def _package_dir(name: str) -> Path:
    import importlib.util

    if name == CV:
        if not CV_DIR.is_dir():
            raise ValueError(f"the selection protocol GS needs OpenCV's sample photos in {CV_DIR}: apt-get install opencv-doc")
        return CV_DIR

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the generic protocols need the Python package {name!r}: {MISSING_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _instances(groups, singles) -> list[tuple[str, list[Path]]]:
    dirs: dict[str, Path] = {}

    def path(pkg: str, rel: str) -> Path:
        if pkg not in dirs:
            dirs[pkg] = _package_dir(pkg)
        p = dirs[pkg] / rel
        if not p.is_file():
            raise ValueError(f"generic protocol photo missing: {p} ({MISSING_HINT})")
        return p

    out = [(name, [path(pkg, rel) for pkg, rel in members]) for name, members in groups]
    out += [(Path(rel).stem, [path(pkg, rel)]) for pkg, rel in singles]
    return out


def _version(groups, singles) -> str:
    spec = {"v": VERSION, "groups": groups, "singles": singles, "query": asdict(QUERY_VIEWS), "n": N_QUERY_VIEWS,
            "max_side": MAX_SIDE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _write(img, path: Path, quality: int = 92) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}.jpg")
    img.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def build(cache: Path, groups=GROUPS, singles=SINGLES, id_base: int = ID_BASE
          ) -> tuple[list[Photo], list[Photo], list[Photo]]:
    """(originals, made-up query views, first photos of the multi-photo instances) as Photos, their
    files made under `cache` once."""
    from PIL import Image

    out = Path(cache) / _version(groups, singles)
    out.mkdir(parents=True, exist_ok=True)
    originals, views, real_queries = [], [], []
    for i, (name, members) in enumerate(_instances(groups, singles)):
        fid = id_base + i
        for j, src in enumerate(members):
            stem = f"{name}-{j}"
            orig = out / f"{stem}.jpg"
            if not orig.is_file():
                with Image.open(src) as im:
                    im = im.convert("RGB")
                    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                    _write(im, orig)
            photo = Photo(orig, fid, -1, name, "generic")
            originals.append(photo)
            if j == 0 and len(members) > 1:
                real_queries.append(photo)
            for v in range(N_QUERY_VIEWS):
                vp = out / f"{stem}-q{v}.jpg"
                if not vp.is_file():
                    with Image.open(orig) as im:
                        _write(made_up_view(im.convert("RGB"), seed_of("generic", VERSION, stem, v), QUERY_VIEWS), vp, 85)
                views.append(Photo(vp, fid, -1, name, "generic"))
    return originals, views, real_queries


def generic_protocols(cache: Path, fit: list[Photo], names=("G", "GR")) -> dict[str, Protocol]:
    out: dict[str, Protocol] = {}
    if "GS" in names:
        o, v, _ = build(cache, GS_GROUPS, GS_SINGLES, ID_BASE + 5_000)
        out["GS"] = Protocol("GS", v, o, f"generic selection (never reported): {len(v)} made-up views of {len(o)} "
                             "OpenCV sample photos -> the originals", fit)
    if not {"G", "GR"} & set(names):
        return out
    originals, views, real_queries = build(cache)
    if "G" in names:
        out["G"] = Protocol("G", views, originals,
                            f"generic: {len(views)} made-up views of {len(originals)} registry photos "
                            f"(mvtb-data, scikit-image) -> the originals", fit)
    if "GR" in names:
        first = {p.path for p in real_queries}
        out["GR"] = Protocol("GR", real_queries, [p for p in originals if p.path not in first],
                             f"generic, real views: the first photo of {len(real_queries)} instances photographed "
                             f"more than once -> their other photos among all the registry photos", fit)
    return out


def picture(out: Path, cache: Path, n: int = 6, side: int = 150) -> Path:
    """A contact sheet: G originals with their query views, grocery train photos with their training views."""
    from PIL import Image

    from visearch import datasets
    from visearch.views import TRAIN_VIEWS

    originals, views, _ = build(cache)
    by_id: dict[int, list[Photo]] = {}
    for v in views:
        by_id.setdefault(v.fine_id, []).append(v)
    rows: list[list[Image.Image]] = []
    for o in originals[:: max(1, len(originals) // n)][:n]:
        rows.append([Image.open(p.path).convert("RGB") for p in (o, *by_id[o.fine_id][:N_QUERY_VIEWS])])
    root = datasets.grocery_root()
    if root is not None:
        train = datasets.grocery_split(root, "train")
        for p in train[:: max(1, len(train) // 3)][:3]:
            img = Image.open(p.path).convert("RGB")
            rows.append([img, *(made_up_view(img, seed_of(p.path.name, i), TRAIN_VIEWS) for i in range(4))])
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * side, len(rows) * side), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            im.thumbnail((side - 4, side - 4))
            sheet.paste(im, (x * side + 2, y * side + 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85)
    return out


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[sys.argv.index("--picture") + 1]) if "--picture" in sys.argv else Path("runs/generic-views.jpg")
    print(picture(target, GENERIC_CACHE))
