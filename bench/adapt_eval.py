"""Catalog adaptation measured: each protocol's database is the catalog adapted to (no label used), its
queries are scored before and after, with the same fit the worker runs (visearch.adapting.fit).

    python -m bench.adapt_eval --repo runs/ots-repo --version 1 --protocols TH-CD,CD --views 4 \\
        --out runs/adapt-eval

The made-up views are made exactly as the job makes them (visearch.adapting.view_bytes, seeded by the
photo and the view's number) and embedded by the full-dimension model as served (ONNX Runtime, one
process). Descriptors are cached in --out (q.npy, db.npy, v<k>.npy per protocol), so a second run
only fits. Settings are chosen on TH-CD (the train hold-out of the CD training products) and reported
on CD (15 products no model trained for CD saw); `--smoke` runs a few photos of each, for CI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from visearch import adapting
from visearch.evaluation.harness import evaluate_embeddings, stderr_progress
from visearch.models.graph import project
from visearch.offline import OfflineEmbedder


def descriptors(emb: OfflineEmbedder, protocol, views: int, cache: Path, progress=stderr_progress
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(queries, database, [database view k]) of `protocol`, cached in `cache`."""
    from visearch.imaging import decode_image

    cache.mkdir(parents=True, exist_ok=True)

    def cached(name: str, make) -> np.ndarray:
        f = cache / f"{name}.npy"
        if not f.exists():
            t = time.perf_counter()
            np.save(f, make())
            progress(f"{protocol.name} {name}: {time.perf_counter() - t:.0f} s")
        return np.load(f)

    q = cached("q", lambda: emb.embed_paths([p.path for p in protocol.queries]))
    db = cached("db", lambda: emb.embed_paths([p.path for p in protocol.database]))

    def view(k: int) -> np.ndarray:
        out = []
        for s in range(0, len(protocol.database), 32):
            imgs = [decode_image(adapting.view_bytes(Path(p.path).read_bytes(), None,
                                                     adapting.view_seed(protocol.name, str(p.path), k)))
                    for p in protocol.database[s:s + 32]]
            out.append(emb.embed_images(imgs, batch=32))
        return np.concatenate(out)

    return q, db, [cached(f"v{k}", lambda k=k: view(k)) for k in range(views)]


def run(repo: Path, version: str, protocols: list[str], views: int, dim: int, out: Path, smoke: bool = False,
        progress=stderr_progress) -> list[dict]:
    from visearch.datasets import grocery_root
    from visearch.evaluation.protocols import get_protocols

    emb = OfflineEmbedder.from_repository(repo, version=version, threads=2)
    rows = []
    for name, protocol in get_protocols(grocery_root(), protocols).items():
        if smoke:
            protocol = protocol.limited(4, n_distractors=6)
        q, db, vs = descriptors(emb, protocol, views, out / name, progress)
        d = min(dim, db.shape[1], len(db) - 1)

        def row(setting: str, qq: np.ndarray, dd: np.ndarray, seconds: float | None = None, protocol=protocol,
                name=name) -> dict:
            m = evaluate_embeddings(protocol, qq, dd)
            r = {"protocol": name, "setting": setting, "mAP": round(m["mAP"], 3), "mAP@20": round(m["mAP@20"], 3),
                 "R@1": round(m["recall@1"], 3), "R@5": round(m["recall@5"], 3), "dim": int(qq.shape[1]),
                 "queries": len(qq), "catalog": len(dd)}
            if seconds is not None:
                r["fit_s"] = round(seconds, 2)
            progress(json.dumps(r))
            return r

        rows.append(row(f"{emb.meta.tag} as is", q, db))
        for k in sorted({1, 2, views} & set(range(1, views + 1))):
            t = time.perf_counter()
            w, b = adapting.fit(db, vs[:k], d)
            rows.append(row(f"adapted, {k} view{'s' if k > 1 else ''}", project(q, w, b), project(db, w, b),
                            time.perf_counter() - t))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"repo": str(repo), "version": version, "views": views, "dim": dim,
                                                 "shrink": adapting.SHRINK, "rows": rows}, indent=1) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True, help="model repository with the full-dimension embedder")
    ap.add_argument("--version", default="1", help="its version (the full-dimension one)")
    ap.add_argument("--protocols", default="TH-CD,CD")
    ap.add_argument("--views", type=int, default=adapting.DEFAULT_VIEWS)
    ap.add_argument("--dim", type=int, default=adapting.DEFAULT_DIM)
    ap.add_argument("--out", type=Path, default=Path("runs/adapt-eval"))
    ap.add_argument("--smoke", action="store_true", help="a few photos per protocol (CI)")
    a = ap.parse_args()
    rows = run(a.repo, a.version, a.protocols.split(","), a.views, a.dim, a.out, a.smoke)
    print("| protocol | descriptor | dim | mAP | mAP@20 | R@1 | R@5 |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['protocol']} | {r['setting']} | {r['dim']} | {r['mAP']:.3f} | {r['mAP@20']:.3f} | {r['R@1']:.2f} "
              f"| {r['R@5']:.2f} |")


if __name__ == "__main__":
    main()
