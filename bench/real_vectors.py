"""Real descriptors for the index benchmark: `python -m bench.real_vectors --views 38 --out runs/real-vectors.npz`.

The served embedder (the model repository's highest version, 128-d by default) run on --views
made-up views of each grocery train photo (visearch.views.made_up_view: a random crop of 35-100 %
of its area at aspect 3:4 to 4:3, a rotation of up to 10 degrees, a mirror half of the time,
brightness, contrast and saturation within +-20 %): what a catalog of real photos looks like to
the index, several photos of each object and objects that resemble each other, unlike Gaussian
clusters. The first view of a photo is the whole photo. Writes `vectors` (float32 [photos x views,
dim], unit length) and `photo` (the photo's index of each row) to --out; `bench.vectors --vectors
FILE` searches them (held-out views as queries).
No label is used: the rows are the photos' views, nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from visearch.views import ViewParams, made_up_view, seed_of

# A random crop of 35-100 % of the area at aspect 3:4 to 4:3, a turn of up to 10 degrees, a mirror
# half of the time, brightness, contrast and saturation within +-20 %; no perspective, blur, patch
# or shrinking: views a catalog could hold, through the training's own view maker.
VIEWS = ViewParams(rotate_deg=10.0, perspective=0.0, colour=0.2, blur_p=0.0, occlude_p=0.0, min_side=1.0)


def views(img, k: int, photo: str, seed: int = 0) -> list:
    """k views of a PIL image: the whole photo, then k - 1 seeded made-up views (visearch.views)."""
    return [img] + [made_up_view(img, seed_of("real-vectors", seed, photo, n), VIEWS) for n in range(1, k)]


def make(n_views: int, out: Path, repo: Path | None = None, limit: int = 0, threads: int = 2, seed: int = 0,
         progress=print) -> dict:
    from visearch import imaging
    from visearch.datasets import grocery_root, grocery_split
    from visearch.offline import OfflineEmbedder
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    embedder = OfflineEmbedder.from_repository(repo or DEFAULT_MODEL_REPOSITORY, "embedder", threads=threads)
    photos = [p.path for p in grocery_split(grocery_root(), "train")]
    photos = photos[:limit] if limit else photos
    vecs, owner = [], []
    t0 = time.perf_counter()
    for i, path in enumerate(photos):
        img = imaging.decode_image(Path(path).read_bytes())
        vecs.append(embedder.embed_images(views(img, n_views, Path(path).name, seed), batch=n_views))
        owner += [i] * n_views
        if (i + 1) % 100 == 0 or i + 1 == len(photos):
            rate = (i + 1) * n_views / (time.perf_counter() - t0)
            progress(f"{(i + 1) * n_views}/{len(photos) * n_views} views embedded ({rate:.0f}/s)")
    x = np.concatenate(vecs).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, vectors=x, photo=np.asarray(owner, np.int32), model=str(embedder.path))
    return {"rows": len(x), "dim": x.shape[1], "photos": len(photos), "views": n_views,
            "ms_per_view": round(embedder.ms_per_image, 2), "model": str(embedder.path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=38, help="views per photo (the first: the whole photo)")
    ap.add_argument("--out", type=Path, required=True, help="the .npz to write")
    ap.add_argument("--model-repository", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0, help="only the first N train photos")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.views < 1:
        ap.error("--views must be at least 1")
    print(make(args.views, args.out, args.model_repository, args.limit, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
