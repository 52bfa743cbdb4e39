"""What the benchmarks share: ONNX Runtime sessions as served, a mesh started with extra settings, results on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path


def ort_session(repo: Path, name: str, version: str = ""):
    """(session, meta) of a served model, one intra-op thread, as the embedded backend runs it."""
    from visearch.offline import OfflineEmbedder

    model = OfflineEmbedder.from_repository(repo, name, version, threads=1)
    return model.session, model.meta


def mesh_up(data: Path, env: dict[str, str], **kw) -> dict:
    """`mesh.up` with extra VISEARCH_* settings for its processes, set for the start only (this
    process's environment is left as it was, for later benchmarks and tests in it)."""
    from visearch import mesh

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return mesh.up(data, log=lambda m: None, **kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def grocery_root() -> Path:
    """The grocery dataset's folder; the benchmark stops with a message when it is missing."""
    from visearch import datasets

    root = datasets.grocery_root()
    if root is None:
        raise SystemExit("the grocery dataset is not at ../shared/data/grocery-store")
    return root


def cli_env(data: Path, model: Path | None = None) -> dict[str, str]:
    """The environment of `visearch` commands against the mesh of `data`: this process's, without its
    VISEARCH_* settings, plus the data folder and (when given) the model repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env["VISEARCH_DATA_DIR"] = str(data)
    if model:
        env["VISEARCH_MODEL_REPOSITORY"] = str(model)
    return env


def show(out: Path | None, result: dict, markdown: str) -> int:
    """Print the result's table and write it under `out` (write_result); 0, for `main` to return."""
    print(markdown)
    write_result(out, result, markdown)
    return 0


def write_result(out: Path | None, result: dict, markdown: str) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "result.md").write_text(markdown)


def stored_local_features(path: Path):
    """A whole photo's local features as ingestion stores them (visearch.local: RootSIFT at the
    catalog's side, the strongest that fit the budget of one object)."""
    import numpy as np

    from visearch import local
    from visearch.imaging import decode_image

    image = np.asarray(decode_image(Path(path).read_bytes()))
    return local.RootSift()(image).inside((0, 0, 1e9, 1e9), local.capacity("rootsift", 32))


def mesh_bench_args(ap, queries: int, real: int, out: Path | None = None):
    """The arguments of a benchmark over a fresh mesh and a catalog (`bench.overhead.fill_catalog`)."""
    ap.add_argument("--catalog-size", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=queries)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--real", type=int, default=real, help="Real photos ingested through the queue (the rest synthetic).")
    ap.add_argument("--milvus-uri", default="", help="A Milvus server instead of the mesh's Milvus Lite.")
    ap.add_argument("--out", type=Path, default=out)
    return ap


def grocery_catalog_and_queries(catalog_size: int, n_real: int, n_queries: int) -> tuple[list, list]:
    """(train photos for a catalog, val photos to search with): up to `n_real` (and at most
    `catalog_size`) train photos of products and `n_queries` val photos, each spread over the products."""
    from visearch.datasets import grocery_split

    root = grocery_root()
    train = [p for p in grocery_split(root, "train") if p.is_product]
    n_real = min(n_real, catalog_size)
    val = [p for p in grocery_split(root, "val") if p.is_product]
    return train[:: max(1, len(train) // n_real)][:n_real], val[:: max(1, len(val) // n_queries)][:n_queries]


def wait_indexed(store, gen, rows: int, progress=print, timeout: float = 900, every: float = 2.0) -> None:
    """Until the catalog's vector index covers its `rows` rows: a store indexes flushed or sealed
    rows in the background, and searches beside that work would time it too."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = store.client.describe_index(gen.collection, "vector")
        indexed = info.get("indexed_rows")
        if int(info.get("pending_index_rows") or 0) == 0 and (indexed is None or int(indexed) >= rows):
            return
        progress(f"indexing: {indexed}/{rows}")
        time.sleep(every)
