"""Training data: which photos, their labels and attributes, the frozen-feature cache, and P x K batches.

The frozen units of the backbone run once per image (through ONNX Runtime, which is
about 3x faster than torch on this CPU) and their output maps are stored under
`.data/train-cache/<arch>-<size>-u<cut>-<weights sha>/<image sha1>-<view>.npy`
(float16). A changed image, backbone weights, input size or cut point misses the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visearch.datasets import Photo
from visearch.imaging import decode_image, to_model_input
from visearch.modeling import backbones
from visearch.modeling.embedder import Embedder
from visearch.models.contract import OPSET
from visearch.ortsession import ort_session
from visearch.views import TRAIN_VIEWS, made_up_view, seed_of

from . import model as tmodel

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".data" / "train-cache"
CACHE_VERSION = 2  # bump when the unit split or the preprocessing changes (2: imaging.PREPROCESSING, OpenCV resize)

# Package type of each coarse group (the FashionNet-style second attribute): what the
# product is sold as. Fruit and vegetables are loose produce.
PACKAGE_TYPES = {
    "Juice": "juice", "Milk": "milk", "Oat-Milk": "milk", "Soy-Milk": "milk", "Sour-Milk": "milk",
    "Oatghurt": "yoghurt", "Soyghurt": "yoghurt", "Yoghurt": "yoghurt", "Sour-Cream": "cream",
}
PACKAGE_TYPE_NAMES = ("loose", "juice", "milk", "yoghurt", "cream")

def package_type(photo: Photo) -> str:
    return PACKAGE_TYPES.get(photo.coarse_name, "loose")


@dataclass(frozen=True)
class Labels:
    """Per-photo integer labels; `fine` is the retrieval identity, the others are attributes."""

    fine: np.ndarray
    coarse: np.ndarray
    package: np.ndarray
    n_fine: int
    n_coarse: int
    n_package: int

    @classmethod
    def of(cls, photos: Sequence[Photo]) -> Labels:
        fine_ids = sorted({p.fine_id for p in photos})
        coarse_ids = sorted({p.coarse_id for p in photos})
        fmap = {c: i for i, c in enumerate(fine_ids)}
        cmap = {c: i for i, c in enumerate(coarse_ids)}
        pmap = {n: i for i, n in enumerate(PACKAGE_TYPE_NAMES)}
        return cls(
            fine=np.array([fmap[p.fine_id] for p in photos], np.int64),
            coarse=np.array([cmap[p.coarse_id] for p in photos], np.int64),
            package=np.array([pmap[package_type(p)] for p in photos], np.int64),
            n_fine=len(fine_ids), n_coarse=len(coarse_ids), n_package=len(PACKAGE_TYPE_NAMES),
        )


# --------------------------------------------------------------------------- which photos


# Each training split's selection protocol: the hold-out of train its epoch (and recipe) is chosen on.
HOLDOUT_OF_SPLIT = {"all": "TH", "cd": "TH-CD", "trainval": "TH", "far": "TF", "iconic": "TH", "trainval-iconic": "TH"}


def training_protocol(root: Path, split: str = "all"):
    """(training photos, selection protocol) of a training split.

    `all`: the train photos minus the TH hold-out (the last 20% of each product's train
    photos), selected on TH; models for P1/P3, val never used. `cd`: the same without products
    44..58 (class-disjoint), selected on TH-CD; models for CD. `trainval`: the production model
    (issue 19): `all`'s photos plus every val photo of a product, selected on TH as `all` is (TH's
    queries stay out of training); P1 and P3 then measure photos it trained on, so its honest rows
    are its `all` twin's, and held-out test photos measure it. `far`: the train photos minus the TF
    hold-out (each product's train photos least like the rest, visearch.evaluation.farsplit), selected
    on TF, a split closer to val's shift than TH; models for P1/P3, val never used. `iconic` and
    `trainval-iconic`: `all` and `trainval` plus the studio ("iconic") image of each product, the
    labelled photos a catalog of products comes with (P3's database: a model trained on them has seen
    P3's catalog, never its queries).
    """
    from visearch.datasets import grocery_iconic, grocery_split
    from visearch.evaluation.protocols import get_protocols

    name = HOLDOUT_OF_SPLIT.get(split)
    if name is None:
        raise ValueError(f"unknown training split {split!r}: one of {', '.join(map(repr, HOLDOUT_OF_SPLIT))}")
    proto = get_protocols(root, (name,))[name]
    photos = list(proto.database)
    if split in ("trainval", "trainval-iconic"):
        photos += [p for p in grocery_split(root, "val") if p.is_product]
    if split in ("iconic", "trainval-iconic"):
        photos += [p for p in grocery_iconic(root) if p.is_product]
    return photos, proto


# --------------------------------------------------------------------------- feature cache


def image_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def load_input(path: Path, size: int, view: str = "id") -> np.ndarray:
    """The model input of one photo (as served: decode + plain resize), as a view of it:
    `id` the photo, `hflip` its mirror, `aug<i>` (i = 0, 1, ...) the i-th made-up view
    (visearch.views.made_up_view, seeded by the image's bytes and i, so every machine caches the same)."""
    data = path.read_bytes()
    if view.startswith("aug") and view[3:].isdigit():
        img = made_up_view(decode_image(data), seed_of(hashlib.sha1(data).hexdigest(), view), TRAIN_VIEWS)
        return to_model_input(img, size)
    x = to_model_input(decode_image(data), size)
    if view == "hflip":
        x = np.ascontiguousarray(x[:, ::-1])
    elif view != "id":
        raise ValueError(f"unknown view {view!r}: 'id', 'hflip' or 'aug<i>'")
    return x


class _Stem(nn.Module):
    """uint8 NHWC images -> output map of unit `cut - 1` (the frozen part)."""

    def __init__(self, model: Embedder, cut: int):
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tmodel.run_units(self.model, tmodel.normalise_images(self.model, images), 0, self.cut)


class FeatureCache:
    """Frozen-unit output maps of photos, computed once and stored per image and view."""

    def __init__(self, cfg: tmodel.ModelConfig, root: Path = DEFAULT_CACHE, threads: int | None = None,
                 progress: Callable[[str], None] | None = None):
        if cfg.cut < 1:
            raise ValueError("train_from 0 trains every unit: nothing to cache (use image mode)")
        self.cfg = cfg
        wsha = backbones.sha256_file(backbones.weights_path(cfg.arch))[:12]
        self.dir = Path(root) / f"{cfg.arch}-{cfg.size}-u{cfg.cut}-{wsha}-v{CACHE_VERSION}"
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.progress = progress or (lambda m: print(m, file=sys.stderr, flush=True))
        self._sess = None

    def _session(self):
        if self._sess is None:
            model = tmodel.make_model(self.cfg).eval()
            stem = _Stem(model, self.cfg.cut).eval()
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "stem.onnx"
                dummy = torch.zeros(2, self.cfg.size, self.cfg.size, 3, dtype=torch.uint8)
                import warnings

                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(stem, (dummy,), str(path), input_names=["images"], output_names=["maps"],
                                      dynamic_axes={"images": {0: "batch"}, "maps": {0: "batch"}},
                                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
                self._sess = ort_session(path, self.threads)
        return self._sess

    def file(self, sha: str, view: str) -> Path:
        return self.dir / f"{sha}-{view}.npy"

    def maps(self, photos: Sequence[Photo], view: str = "id", batch: int = 16) -> np.ndarray:
        """float16 [N, C, h, w] maps of `photos` in order, computing the missing ones."""
        shas = [image_sha1(p.path) for p in photos]
        missing = sorted({i for i, s in enumerate(shas) if not self.file(s, view).exists()})
        if missing:
            sess = self._session()
            t0 = time.perf_counter()
            for n, i in enumerate(range(0, len(missing), batch)):
                idx = missing[i:i + batch]
                x = np.stack([load_input(photos[j].path, self.cfg.size, view) for j in idx])
                out = sess.run(["maps"], {"images": x})[0].astype(np.float16)
                for j, m in zip(idx, out, strict=True):
                    tmp = self.file(shas[j], view).with_suffix(f".tmp{os.getpid()}.npy")
                    np.save(tmp, m)
                    os.replace(tmp, self.file(shas[j], view))
                done = min(i + batch, len(missing))
                if n % 10 == 0 or done == len(missing):
                    el = time.perf_counter() - t0
                    self.progress(f"cache {view}: {done}/{len(missing)} images, {el:.0f}s, "
                                  f"ETA {el / done * (len(missing) - done):.0f}s")
        return np.stack([np.load(self.file(s, view)) for s in shas])


# --------------------------------------------------------------------------- batches


class PKSampler:
    """Batches of `p` classes x `k` photos (drawn without replacement within a class while it lasts).

    Metric losses need positives in every batch; classification losses are indifferent.
    Deterministic for a given seed.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0, steps: int | None = None):
        self.labels = np.asarray(labels)
        self.classes = np.unique(self.labels)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self.p = min(p, len(self.classes))
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.steps = steps or max(1, len(self.labels) // (self.p * self.k))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[np.ndarray]:
        pools = {c: self.rng.permutation(ix) for c, ix in self.by_class.items()}
        pos = dict.fromkeys(pools, 0)
        for _ in range(self.steps):
            batch = []
            for c in self.rng.choice(self.classes, self.p, replace=False):
                c = int(c)
                ix = pools[c]
                if pos[c] + self.k > len(ix):
                    pools[c] = ix = self.rng.permutation(ix)
                    pos[c] = 0
                take = ix[pos[c]:pos[c] + self.k]
                if len(take) < self.k:  # class smaller than k: repeat photos
                    take = self.rng.choice(ix, self.k, replace=True)
                pos[c] += self.k
                batch.append(take)
            yield np.concatenate(batch)


def augment_maps(x: torch.Tensor, rng: torch.Generator, crop: int = 0, flip: bool = False) -> torch.Tensor:
    """Cheap augmentation on cached maps: one random `crop` x `crop` window and a random mirror per batch.

    Valid for units whose convolutions have stride 1 ('SAME' padding of a stride-1 conv
    does not depend on the map size); a stride-2 unit after the cut gets whole maps only.
    """
    if crop and crop < x.shape[-1]:
        h, w = x.shape[-2:]
        y0 = int(torch.randint(0, h - crop + 1, (1,), generator=rng))
        x0 = int(torch.randint(0, w - crop + 1, (1,), generator=rng))
        x = x[:, :, y0:y0 + crop, x0:x0 + crop]
    if flip and bool(torch.rand((), generator=rng) < 0.5):
        x = x.flip(-1)
    return x
