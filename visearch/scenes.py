"""Object-in-scene benchmark images: catalog objects pasted small into real cluttered photos.

    scenes = build_scenes(root, out_dir, seed=0)     # one scene per iconic image, with its exact box

Each of the grocery dataset's 81 iconic (studio) images is pasted into a real shop
photo of fruit or vegetables (train split, so never a query), at 25-40 % of the scene's
side, at a random position off the centre; the box is exact. The scenes play the part
of catalog images where the object is a small part of the frame; queries are the val
phone photos of the packaged products (positive: the scene holding that product).
Deterministic for a seed; written once as JPEG under `out_dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visearch import datasets

SCENE_SIZE = 480
SCALE = (0.25, 0.40)


@dataclass(frozen=True)
class Scene:
    photo: datasets.Photo  # the scene file, labelled with the pasted object's class
    box: tuple[float, float, float, float]  # where the object is, pixels of the scene
    background: Path


def build_scenes(root: Path, out_dir: Path, seed: int = 0, size: int = SCENE_SIZE) -> list[Scene]:
    out_dir = Path(out_dir)
    manifest = out_dir / "scenes.json"
    iconic = datasets.grocery_iconic(root)
    if manifest.is_file():
        rows = json.loads(manifest.read_text())
        if rows.get("seed") == seed and rows.get("size") == size and len(rows["scenes"]) == len(iconic):
            by_id = {p.fine_id: p for p in iconic}
            return [Scene(_relabel(by_id[r["fine_id"]], out_dir / r["file"]), tuple(r["box"]), Path(r["background"]))
                    for r in rows["scenes"]]
    rng = np.random.default_rng(seed)
    backgrounds = [p for p in datasets.grocery_split(root, "train") if not p.is_product]
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes, rows = [], []
    for obj in iconic:
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        scene = Image.open(bg.path).convert("RGB").resize((size, size), Image.BILINEAR)
        item = Image.open(obj.path).convert("RGB")
        side = float(rng.uniform(*SCALE)) * size
        scale = side / max(item.size)
        w, h = max(8, round(item.width * scale)), max(8, round(item.height * scale))
        item = item.resize((w, h), Image.BILINEAR)
        x = int(rng.integers(0, size - w + 1))
        y = int(rng.integers(0, size - h + 1))
        scene.paste(item, (x, y))
        name = f"scene-{obj.fine_id:02d}.jpg"
        scene.save(out_dir / name, quality=92)
        box = (float(x), float(y), float(x + w), float(y + h))
        scenes.append(Scene(_relabel(obj, out_dir / name), box, bg.path))
        rows.append({"file": name, "fine_id": obj.fine_id, "box": box, "background": str(bg.path)})
    manifest.write_text(json.dumps({"seed": seed, "size": size, "scenes": rows}, indent=1))
    return scenes


def _relabel(obj: datasets.Photo, path: Path) -> datasets.Photo:
    return datasets.Photo(path, obj.fine_id, obj.coarse_id, obj.fine_name, obj.coarse_name)
