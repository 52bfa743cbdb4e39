"""Classic baseline: dense SIFT (OpenCV) + k-means codebook + VLAD + PCA-whitening. Not a CNN; no ONNX export.

Pipeline (Jegou et al. 2010, with the "All about VLAD" normalisations):
  1. decode as served (visearch.imaging), grey, plain resize to `side` x `side`;
  2. upright SIFT descriptors on a dense grid (every 8 px, 24 px patches, one
     scale: 38 x 38 = 1,444 per image), as RootSIFT (L1-normalise, square root);
  3. hard assignment to a k-means codebook (k=64) learned on TRAIN descriptors;
  4. VLAD: residual sums, intra-normalisation, signed square root, L2 (k*128 dims);
  5. PCA-whitening (dim and power chosen on the train hold-out), L2.

Descriptors are cached per image as uint8 (OpenCV's SIFT values are integers in 0..255).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visearch.imaging import decode_image

CACHE_VERSION = "dsift-v1"


@dataclass(frozen=True)
class DenseSIFT:
    """Upright SIFT descriptors on a dense grid: every `step` px, each over a `patch` px square (4 x 4 bins).

    OpenCV sizes a descriptor from the keypoint `size`: a bin is 3 * size / 2 px wide, so a
    `patch` px descriptor (bins of patch/4 px) needs size = patch / 6. (Passing size=patch, as
    one might expect, describes a 6x larger window and is about 20x slower.)
    """

    side: int = 320
    step: int = 8
    patch: int = 24

    @property
    def size(self) -> float:
        return self.patch / 6.0

    def grid(self) -> list[tuple[float, float]]:
        half = self.patch // 2
        return [(float(x), float(y)) for y in range(half, self.side - half + 1, self.step)
                for x in range(half, self.side - half + 1, self.step)]

    @property
    def n(self) -> int:
        return len(self.grid())

    def gray(self, path: Path) -> np.ndarray:
        from PIL import Image

        img = decode_image(Path(path).read_bytes()).convert("L")
        if img.size != (self.side, self.side):
            img = img.resize((self.side, self.side), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)

    def describe_gray(self, gray: np.ndarray) -> np.ndarray:
        """SIFT descriptors [n, 128] uint8 at the dense grid of a grey `side` x `side` image."""
        import cv2

        sift = _sift()
        kps = [cv2.KeyPoint(x, y, self.size, 0, 0, 0) for x, y in self.grid()]  # angle 0: upright
        kps_out, d = sift.compute(gray, kps)
        if d is None or len(kps_out) != len(kps):
            raise RuntimeError(f"OpenCV returned {0 if d is None else len(d)} descriptors for {len(kps)} grid points")
        return np.clip(np.rint(d), 0, 255).astype(np.uint8)

    def describe(self, path: Path) -> np.ndarray:
        return self.describe_gray(self.gray(path))

    def key(self) -> str:
        import cv2

        return f"{CACHE_VERSION}-{cv2.__version__}-{self.side}-{self.step}-{self.patch}"


_SIFT = None


def _sift():
    global _SIFT
    if _SIFT is None:
        import cv2

        cv2.setNumThreads(1)
        _SIFT = cv2.SIFT_create()
    return _SIFT


def root_sift(d: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise square root."""
    d = np.asarray(d, np.float32)
    return np.sqrt(d / np.maximum(d.sum(-1, keepdims=True), 1e-12))


class SiftBank:
    """Dense SIFT of many images, cached on disk as one uint8 array [n, points, 128] (memory when cache is None)."""

    def __init__(self, dsift: DenseSIFT = DenseSIFT(), cache: Path | None = None,
                 progress: Callable[[str], None] | None = None):
        self.dsift, self.cache = dsift, Path(cache) if cache is not None else None
        self.progress = progress or (lambda m: None)
        self.index: dict[Path, int] = {}
        self.data: np.ndarray | None = None

    def prepare(self, paths: Sequence[Path]) -> None:
        paths = [Path(p) for p in paths]
        if self.data is not None and all(p in self.index for p in paths):
            return
        digest = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
        d = self.cache / "sift" / f"{self.dsift.key()}-{digest}" if self.cache is not None else None
        if d is not None:
            for cand in sorted((self.cache / "sift").glob(f"{self.dsift.key()}-*")):
                try:
                    keys = [Path(k) for k in json.loads((cand / "keys.json").read_text())]
                    arr = np.load(cand / "sift.npy", mmap_mode="r")
                except (OSError, ValueError):
                    continue
                index = {k: i for i, k in enumerate(keys)}
                if all(p in index for p in paths) and len(arr) == len(keys):
                    self.index, self.data = index, arr
                    return
        n, t0 = len(paths), time.perf_counter()
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(d / "sift.npy.tmp", "w+", np.uint8, (n, self.dsift.n, 128))
        else:
            arr = np.zeros((n, self.dsift.n, 128), np.uint8)
        for i, p in enumerate(paths):
            arr[i] = self.dsift.describe(p)
            if (i + 1) % 250 == 0 or i + 1 == n:
                self.progress(f"  dense SIFT: {i + 1}/{n} images ({(i + 1) / (time.perf_counter() - t0):.1f}/s)")
        if d is not None:
            arr.flush()
            del arr
            (d / "sift.npy.tmp").replace(d / "sift.npy")
            (d / "keys.json").write_text(json.dumps([str(p) for p in paths]))
            arr = np.load(d / "sift.npy", mmap_mode="r")
        self.index, self.data = {p: i for i, p in enumerate(paths)}, arr

    def get(self, paths: Sequence[Path]) -> np.ndarray:
        self.prepare(paths)
        assert self.data is not None
        return np.asarray(self.data[[self.index[Path(p)] for p in paths]])


class SiftVLAD:
    """Fit on train descriptors, then embed: RootSIFT -> VLAD(k) -> PCA-whitening -> L2."""

    def __init__(self, k: int = 64, wdim: int | None = 512, wpower: float = 0.5, seed: int = 0):
        self.k, self.wdim, self.wpower, self.seed = k, wdim, wpower, seed
        self.centres: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.P: np.ndarray | None = None

    def fit_codebook(self, descs: np.ndarray, per_image: int = 200, max_images: int = 500) -> SiftVLAD:
        """k-means on RootSIFT of up to `per_image` points of up to `max_images` images of `descs` [n, M, 128]."""
        from visearch.modeling.aggregation import kmeans

        rng = np.random.default_rng(self.seed)
        imgs = rng.choice(len(descs), min(max_images, len(descs)), replace=False)
        pts = [root_sift(descs[i][rng.choice(descs.shape[1], min(per_image, descs.shape[1]), replace=False)])
               for i in sorted(imgs)]
        self.centres = kmeans(np.concatenate(pts), self.k, seed=self.seed)
        return self

    def vlads(self, descs: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Un-whitened VLADs [n, k*128] of descriptor sets `descs` [n, M, 128]."""
        import torch

        from visearch.modeling.aggregation import vlad

        assert self.centres is not None, "fit_codebook first"
        c = torch.from_numpy(self.centres)
        out = []
        with torch.no_grad():
            for i in range(0, len(descs), chunk):
                x = torch.from_numpy(root_sift(descs[i:i + chunk])).transpose(1, 2)  # [n, 128, M]
                out.append(vlad(x, c, None, intra=True, power=0.5).numpy())
        return np.concatenate(out)

    def fit_whitening(self, V: np.ndarray, cache: dict | None = None) -> SiftVLAD:
        from visearch.modeling.methods import fit_whitening

        w = fit_whitening(V, self.wdim or V.shape[1], self.wpower, cache)
        self.mean = None
        self.P = w.linear.weight.detach().numpy().copy()
        self._bias = w.linear.bias.detach().numpy().copy()
        return self

    def whiten(self, V: np.ndarray) -> np.ndarray:
        if self.P is None:
            return V
        Y = V @ self.P.T + self._bias
        return Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)

    def fit(self, descs: np.ndarray) -> SiftVLAD:
        self.fit_codebook(descs)
        return self.fit_whitening(self.vlads(descs))

    def embed(self, descs: np.ndarray) -> np.ndarray:
        return self.whiten(self.vlads(descs))

    @property
    def dim(self) -> int:
        return int(self.P.shape[0]) if self.P is not None else self.k * 128
