"""Backbone feature maps of many images, computed once and cached on disk, so every method is measured cheaply.

A bank holds, for one list of images, the maps of the taps `STORE_TAPS` (s5, s7,
head) as float32 `.npy` files (memory-mapped on reading) under
`<cache>/maps/<arch>-<size>-<model hash>-<images hash>/`. The model hash covers
the weights file's sha256, the architecture, input size, normalisation, the
preprocessing (visearch.imaging's decode + plain bilinear resize, as served: `to_model_input`) and
`CACHE_VERSION`; the images hash covers every image path. Maps are computed in
torch exactly as `MethodEmbedder` computes them before its head, so a head run on
cached maps gives the exported model's descriptor (up to float rounding;
ONNX-vs-torch parity is checked separately).

Sizes: EfficientNet-Lite0 at 320 px stores 205k floats (820 KB) per image, 2.5 GB for
the 3,017 grocery images; the backbone pass takes about 3 min on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from visearch.imaging import PREPROCESSING
from visearch.modeling import backbones
from visearch.modeling.methods import NORMALISATION, STORE_TAPS, TapBackbone
from visearch.offline import load_batch  # noqa: F401 - the served input, also imported from here

CACHE_VERSION = "maps-v1"


def _hash(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


class FeatureStore:
    """Feature maps of images for one backbone and input size, from a disk cache (or memory when cache is None)."""

    def __init__(self, arch: str, size: int, cache: Path | None = None, batch: int = 16,
                 progress: Callable[[str], None] | None = None):
        self.arch, self.size, self.batch = arch, size, batch
        self.cache = Path(cache) if cache is not None else None
        self.progress = progress or (lambda m: None)
        self.backbone = backbones.load_backbone(arch, size)
        self.net = TapBackbone(self.backbone, STORE_TAPS).eval()
        mean, std = NORMALISATION[arch]
        self._scale = torch.tensor(1.0 / (255.0 * np.asarray(std)), dtype=torch.float32)
        self._shift = torch.tensor(-np.asarray(mean) / np.asarray(std), dtype=torch.float32)
        wsha = backbones.sha256_file(backbones.weights_path(arch))
        self.model_hash = _hash([CACHE_VERSION, arch, str(size), wsha, repr(mean), repr(std), PREPROCESSING])
        with torch.no_grad():
            maps = self.net(torch.zeros(1, 3, size, size))
        self.shapes = {t: tuple(int(d) for d in m.shape[1:]) for t, m in zip(STORE_TAPS, maps, strict=True)}
        self._banks: list[tuple[dict[Path, int], dict[str, np.ndarray]]] = []

    # ------------------------------------------------------------------ computing

    @torch.no_grad()
    def compute(self, paths: Sequence[Path]) -> Iterator[tuple[torch.Tensor, ...]]:
        """Maps of all STORE_TAPS for `paths`, batch by batch."""
        for i in range(0, len(paths), self.batch):
            x = torch.from_numpy(load_batch(paths[i:i + self.batch], self.size))
            x = (x.to(torch.float32) * self._scale + self._shift).permute(0, 3, 1, 2)
            yield self.net(x)

    def prepare(self, paths: Sequence[Path]) -> None:
        """Make the maps of `paths` available: load a cached bank holding them all, else compute one."""
        want = [Path(p) for p in paths]
        if self._find(want) is not None:
            return
        if self.cache is not None:
            for d in sorted((self.cache / "maps").glob(f"{self.arch}-{self.size}-{self.model_hash}-*")):
                bank = self._open(d)
                if bank is not None and all(p in bank[0] for p in want):
                    self._banks.append(bank)
                    return
        self._banks.append(self._build(want))

    def _open(self, d: Path):
        try:
            keys = [Path(k) for k in json.loads((d / "keys.json").read_text())]
            arrays = {t: np.load(d / f"{t}.npy", mmap_mode="r") for t in STORE_TAPS}
        except (OSError, ValueError):
            return None
        if any(len(a) != len(keys) for a in arrays.values()):
            return None
        return {k: i for i, k in enumerate(keys)}, arrays

    def _build(self, paths: list[Path]):
        t0 = time.perf_counter()
        n = len(paths)
        if self.cache is not None:
            d = self.cache / "maps" / f"{self.arch}-{self.size}-{self.model_hash}-{_hash([str(p) for p in paths])}"
            d.mkdir(parents=True, exist_ok=True)
            arrays = {t: np.lib.format.open_memmap(d / f"{t}.npy.tmp", "w+", np.float32, (n, *self.shapes[t]))
                      for t in STORE_TAPS}
        else:
            arrays = {t: np.zeros((n, *self.shapes[t]), np.float32) for t in STORE_TAPS}
        done = 0
        for maps in self.compute(paths):
            for t, m in zip(STORE_TAPS, maps, strict=True):
                arrays[t][done:done + len(m)] = m.numpy()
            done += len(maps[0])
            if done % (self.batch * 16) == 0 or done == n:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                self.progress(f"  {self.arch}@{self.size} maps: {done}/{n} images ({rate:.1f}/s)")
        if self.cache is not None:
            for t, a in arrays.items():
                a.flush()
                del a
                (d / f"{t}.npy.tmp").replace(d / f"{t}.npy")
            (d / "keys.json").write_text(json.dumps([str(p) for p in paths]))
            bank = self._open(d)
            assert bank is not None
            return bank
        return {p: i for i, p in enumerate(paths)}, arrays

    # ------------------------------------------------------------------ reading

    def _find(self, paths: Sequence[Path]):
        for bank in self._banks:
            if all(p in bank[0] for p in paths):
                return bank
        return None

    def maps(self, taps: Sequence[str], paths: Sequence[Path], chunk: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
        """Maps of `taps` for `paths`, in order, `chunk` images at a time (computed first if missing)."""
        paths = [Path(p) for p in paths]
        bank = self._find(paths)
        if bank is None:
            self.prepare(paths)
            bank = self._find(paths)
            assert bank is not None
        index, arrays = bank
        rows = np.array([index[p] for p in paths], dtype=np.int64)
        for i in range(0, len(rows), chunk):
            r = rows[i:i + chunk]
            yield tuple(torch.from_numpy(np.ascontiguousarray(arrays[t][r])) for t in taps)
