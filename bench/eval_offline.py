"""Offline retrieval evaluation of embedder ONNX models on the Grocery Store dataset.

Protocols (dataset DATA.md; visearch.evaluation.protocols):
  photo->photo    P1: queries = val photos of packaged products, database = all train
                  photos; positives = train photos of the query's fine class.
  photo->catalog  P3: queries = val product photos, database = the 81 iconic images;
                  the positive is the iconic image of the query's class.
  (catalog_all)   as photo->catalog but with every val photo as a query.

Embeds through onnxruntime exactly as served (decode_image + to_model_input,
uint8 NHWC in, L2-normalised vectors out, 1 intra-op thread, batches of 32).

    python -m bench.eval_offline --repo model_repository --out runs/eval.json
    python -m bench.eval_offline --config efficientnet_lite0:rmac:320 --config mobilenet_v2:gem:224 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from visearch import datasets
from visearch.evaluation.harness import rank
from visearch.evaluation.protocol import Protocol
from visearch.evaluation.protocols import split_protocols
from visearch.metrics import retrieval_report
from visearch.models.record import ModelRecord
from visearch.offline import OfflineEmbedder

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CACHE = ROOT / ".data" / "eval-cache"


def embed(model_path: Path, input_size: int, paths: list[Path], batch: int = 32, threads: int = 1) -> tuple[np.ndarray, float]:
    """Embeddings of `paths` as served, and the mean model time per image in ms."""
    model = OfflineEmbedder(model_path, input_size, threads)
    return model.embed_paths(paths, batch), 1000 * model.model_seconds / len(paths)


def cached_embed(model_dir: Path, photos: list[datasets.Photo], cache: Path, batch: int, threads: int,
                 use_cache: bool = True) -> tuple[np.ndarray, float, dict]:
    """Embed with the model version in `model_dir` (model.onnx + meta.json), reusing cached vectors."""
    meta = ModelRecord.read(model_dir).to_dict()
    keys = [p.key for p in photos]
    cache.mkdir(parents=True, exist_ok=True)
    # Keyed by the model file's hash: a rebuilt model is never served stale vectors.
    # and by the preprocessing's name (visearch.imaging.PREPROCESSING).
    from visearch.imaging import preprocessing_tag

    cfile = cache / f"{meta['id']}-{meta['model_sha256'][:12]}-{preprocessing_tag()}-{len(keys)}.npz"
    if cfile.exists() and use_cache:
        data = np.load(cfile, allow_pickle=False)
        if list(data["keys"]) == keys:
            return data["emb"], float(data["ms"]), meta
    emb, ms = embed(model_dir / meta["model_file"], meta["input_size"], [p.path for p in photos], batch, threads)
    np.savez(cfile, keys=np.array(keys), emb=emb, ms=ms)
    return emb, ms, meta


def protocols(train, val, iconic) -> dict[str, Protocol]:
    """The three protocols, by report key: P1 and P3 as visearch.evaluation defines them, and catalog_all."""
    p = split_protocols(train, val, iconic, ("P1", "P3"))
    every = Protocol("catalog_all", list(val), list(iconic), "all val photos -> the 81 iconic images (1 positive)")
    return {"photo_to_photo": p["P1"], "photo_to_catalog": p["P3"], "catalog_all": every}


def report(proto: Protocol, emb: dict[str, np.ndarray]) -> dict:
    """retrieval_report of `proto` from embeddings keyed by photo key (ranked by inner product: unit vectors)."""
    q = np.stack([emb[p.key] for p in proto.queries])
    db = np.stack([emb[p.key] for p in proto.database])
    order, _ = rank(q, db)
    keys = [p.key for p in proto.database]
    rankings = [[keys[j] for j in row] for row in order]
    positives = [{keys[j] for j in proto.positives(p)} for p in proto.queries]
    return retrieval_report(rankings, positives)


def evaluate(emb: dict[str, np.ndarray], train, val, iconic) -> dict:
    """The three protocol reports from embeddings keyed by photo key."""
    return {name: report(proto, emb) for name, proto in protocols(train, val, iconic).items()}


def _build(spec: str, cache: Path) -> Path:
    """Build `arch:pooling:size` into a private repository under the cache; returns its version dir.

    Always rebuilt (seconds): the export is deterministic, so unchanged code keeps the
    model hash and the cached embeddings.
    """
    import torch

    from visearch.modeling.export import build_embedder
    from visearch.models.contract import EmbedderConfig

    torch.set_num_threads(1)
    arch, pool, size = spec.split(":")
    cfg = EmbedderConfig(arch=arch, pooling=pool, size=int(size))
    repo = cache / "models" / cfg.id
    build_embedder(repo, cfg, progress=lambda m: None, write_config=True)
    return repo / cfg.name / str(cfg.version)


def _run_one(job: tuple[str, str, Path, int, int, bool]) -> dict:
    kind, target, cache, batch, threads, use_cache = job
    root = datasets.grocery_root()
    train, val, iconic = datasets.grocery_split(root, "train"), datasets.grocery_split(root, "val"), datasets.grocery_iconic(root)
    model_dir = _build(target, cache) if kind == "config" else Path(target)
    photos = val + train + iconic
    t0 = time.perf_counter()
    vecs, ms, meta = cached_embed(model_dir, photos, cache, batch, threads, use_cache)
    elapsed = time.perf_counter() - t0
    norms = np.linalg.norm(vecs, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-4):
        raise RuntimeError(f"{meta['id']}: embeddings are not unit-norm (range {norms.min():.4f}..{norms.max():.4f})")
    result = evaluate(dict(zip([p.key for p in photos], vecs, strict=True)), train, val, iconic)
    print(f"  {meta['id']}: {len(photos)} images, {elapsed:.0f}s", file=sys.stderr, flush=True)
    return {"model": meta["id"], "model_dir": str(model_dir), "dim": meta["dim"], "ms_per_image": ms, **result}


def print_table(results: list[dict]) -> None:
    head = (f"{'model':34} | {'photo->photo':^36} | {'photo->catalog':^30} | {'all val':^7} | {'ms/img':>6}\n"
            f"{'':34} | {'mAP':>6} {'mAP@20':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6} | {'mAP':>6} {'R@1':>6} "
            f"{'R@5':>6} {'R@10':>6} | {'R@1':>7} | {'1 thr':>6}")
    print(head)
    print("-" * len(head.splitlines()[1]))
    for r in results:
        a, b, c = r["photo_to_photo"], r["photo_to_catalog"], r["catalog_all"]
        ms = f"{r['ms_per_image']:6.1f}"
        print(f"{r['model']:34} | {a['mAP']:6.3f} {a['mAP@20']:6.3f} {a['recall@1']:6.3f} {a['recall@5']:6.3f} "
              f"{a['recall@10']:6.3f} | {b['mAP']:6.3f} {b['recall@1']:6.3f} {b['recall@5']:6.3f} {b['recall@10']:6.3f} "
              f"| {c['recall@1']:7.3f} | {ms}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, action="append", default=[],
                    help="evaluate the built embedder of this model repository (repeatable)")
    ap.add_argument("--config", action="append", default=[], metavar="ARCH:POOLING:SIZE",
                    help="build and evaluate this embedder config (repeatable; needs torch)")
    ap.add_argument("--model-name", default="embedder")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built models and embeddings cache")
    ap.add_argument("--no-cache", action="store_true", help="re-embed even when cached vectors exist")
    ap.add_argument("--jobs", type=int, default=1, help="models evaluated in parallel processes")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args(argv)

    root = datasets.grocery_root()
    if root is None:
        print(f"grocery dataset not found: set {datasets.ENV_VAR} or place it at shared/data/grocery-store", file=sys.stderr)
        return 2
    if not args.repo and not args.config:
        args.repo = [ROOT / "model_repository"]
    jobs: list[tuple] = []
    for repo in args.repo:
        version_dirs = sorted((repo / args.model_name).glob("[0-9]*/meta.json"), key=lambda p: int(p.parent.name))
        if not version_dirs:
            print(f"{repo}: no built {args.model_name} (run python -m visearch.building --repo {repo})", file=sys.stderr)
            return 2
        jobs.append(("repo", str(version_dirs[-1].parent), args.cache, args.batch, args.threads, not args.no_cache))
    jobs += [("config", spec, args.cache, args.batch, args.threads, not args.no_cache) for spec in args.config]

    print(f"evaluating {len(jobs)} model(s) on {root}", file=sys.stderr)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run_one, jobs))
    else:
        results = [_run_one(j) for j in jobs]
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": "python -m bench.eval_offline " + " ".join(sys.argv[1:] if argv is None else argv),
            "dataset": str(root),
            "protocols": {
                "photo_to_photo": "queries: val product photos (fine 28-58); database: all train photos",
                "photo_to_catalog": "queries: val product photos; database: 81 iconic images",
                "catalog_all": "queries: all val photos; database: 81 iconic images",
            },
            "onnxruntime_threads": args.threads,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
