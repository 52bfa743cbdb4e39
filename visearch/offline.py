"""Offline embedding: a model run in this process over many images, their input made exactly as served.

Evaluation (`visearch eval`), `visearch models reduce` and every benchmark embed through this
module, so they see the descriptors the embedding service computes:

    emb = OfflineEmbedder.from_repository(repo, "embedder", threads=1)   # or OfflineEmbedder(path_to_onnx)
    vectors = emb.embed_paths(paths, batch=32)                             # float32 [n, dim]
    vectors, region_map = emb.embed_paths(paths, outputs=["embeddings", "region_map"])

Images are decoded and resized by `visearch.imaging` (decode_image + to_model_input: uint8
NHWC), the version is found and its meta record read by `visearch.inference` (resolve_version,
read_meta), and sessions are opened by `visearch.ortsession.ort_session` (re-exported here, for
plain sessions: timing, parity checks) with the options the embedded backend runs (full graph
optimisation, `threads` intra-op threads, one inter-op thread, the CPU). Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from visearch.imaging import crop, decode_image, to_model_input
from visearch.inference import read_meta
from visearch.ortsession import ort_session

__all__ = ["OfflineEmbedder", "image_batch", "load_batch", "ort_session"]


def load_batch(paths: Sequence[Path], size: int) -> np.ndarray:
    """uint8 NHWC model input of `paths`, exactly as served (decode_image + to_model_input)."""
    return np.stack([to_model_input(decode_image(Path(p).read_bytes()), size) for p in paths])


def image_batch(images: Sequence, size: int, boxes: Sequence | None = None) -> np.ndarray:
    """uint8 NHWC model input of decoded images, each cropped to its box first (None: the whole image)."""
    boxes = boxes or [None] * len(images)
    return np.stack([to_model_input(crop(im, b), size) for im, b in zip(images, boxes, strict=True)])


class OfflineEmbedder:
    """One model version (an ONNX file and its input size) run batch by batch in this process.

    `outputs` default to the model's first output (the embeddings); any other outputs (region maps,
    ...) can be asked for by name. `model_seconds` and `images` add up the forwards' time and count,
    for a ms-per-image figure that leaves decoding out.
    """

    def __init__(self, path: Path | str, input_size: int | None = None, threads: int | None = 1,
                 output: str | None = None, meta=None):
        self.path = Path(path)
        self.meta = meta
        self.session = ort_session(self.path, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = output or self.session.get_outputs()[0].name
        self.size = int(input_size or inp.shape[1])
        self.model_seconds = 0.0
        self.images = 0

    @classmethod
    def from_repository(cls, repo: Path | str, name: str = "embedder", version: str = "",
                        threads: int | None = 1) -> OfflineEmbedder:
        """The served version of model `name` in the repository (`version`, "" = the highest), its meta
        record (visearch.inference.ModelMeta) as `meta`."""
        repo = Path(repo)
        meta = read_meta(repo, name, version)
        return cls(repo / name / meta.version / "model.onnx", meta.input_size, threads, meta.output_name, meta)

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """One forward on a prepared batch (uint8 NHWC): the named outputs (default: the embeddings)."""
        t = time.perf_counter()
        got = self.session.run(list(outputs or [self.output_name]), {self.input_name: x})
        self.model_seconds += time.perf_counter() - t
        self.images += len(x)
        return got

    def batches(self, paths: Sequence[Path], batch: int = 32, outputs: Sequence[str] | None = None
                ) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(start index, outputs) of each batch of image files, decoded and resized as served."""
        for i in range(0, len(paths), batch):
            yield i, self.run(load_batch(paths[i:i + batch], self.size), outputs)

    def embed_paths(self, paths: Sequence[Path], batch: int = 32, outputs: Sequence[str] | None = None,
                    progress: Callable[[int, int], None] | None = None, every: int = 10):
        """The outputs of image files, concatenated: one array (default: the embeddings, float32 [n, dim]),
        or a list of arrays when `outputs` are named. `progress(done, total)` after every `every` batches."""
        parts: list[list[np.ndarray]] = []
        for i, got in self.batches(paths, batch, outputs):
            parts.append(got)
            if progress is not None and (i // batch) % every == every - 1:
                progress(i + len(got[0]), len(paths))
        if not parts:
            raise ValueError("no images to embed")
        joined = [np.concatenate(col) for col in zip(*parts, strict=True)]
        return joined if outputs else joined[0]

    def embed_images(self, images: Sequence, boxes: Sequence | None = None, batch: int = 16) -> np.ndarray:
        """The embeddings of decoded images (PIL), each cropped to its box first (None: the whole image)."""
        boxes = boxes or [None] * len(images)
        out = [self.run(image_batch(images[s:s + batch], self.size, boxes[s:s + batch]))[0]
               for s in range(0, len(images), batch)]
        return np.concatenate(out)

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.model_seconds / self.images if self.images else 0.0
