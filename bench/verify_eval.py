"""Geometric verification as a re-rank stage, measured in one run: extractors, the fusion rule, the
match threshold, on the grocery protocols, every choice made on the train hold-out TH.

    python -m bench.verify_eval --model model_repository --selection-model runs/ots-repo --out runs/verify
    python -m bench.verify_eval fit-pca            # refit visearch/data/rootsift-pca32.npz
    python -m bench.verify_eval --smoke --out DIR  # CI: a few queries, same code

What it does (all with the functions the services run: visearch.local):
1. Local features of every image: RootSIFT (PCA 32, int8) and ORB at the stored budget (8 KB per
   object: 227 RootSIFT or 227 ORB features), the query side unbounded (1,000), and the
   unbudgeted RootSIFT at 1,000 as a reference; the CNN's own conv-map features (DELF-style, from
   the embedder's `region_map`).
2. Global descriptors of the served embedder (ONNX Runtime, input as served), and of
   --selection-model (e.g. the off-the-shelf embedder: TH is nearly solved by the fine-tuned
   model, whose selection rows would be ties; the off-the-shelf ranking of the same train photos
   still has hard negatives).
3. Each query's global top 100; its top 20 verified against the query (inliers, hulls).
4. The fusion parameters (min inliers, min coverage, weight, cap) picked on TH by the mean of the
   two models' mAP@20; the match threshold picked on TH for pair precision >= 0.95 (pooled over
   both models' top 20 lists). Then P1, P3 and S (object in scene) are scored once with what was
   picked: global, alpha-QE (the previous default), verify.
Writes results.json, results.md, the precision/recall curve of the threshold (curve-P1.png) and a
picture of verified correspondences (correspondences.jpg) into --out, and with --write-params
the chosen parameters as `<model version>/verify.json` beside the served model.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from visearch import datasets, local, regions
from visearch.evaluation.protocols import Protocol, get_protocols
from visearch.imaging import decode_image
from visearch.inference import resolve_version
from visearch.metrics import average_precision
from visearch.models.record import ModelRecord
from visearch.offline import OfflineEmbedder

N_CANDIDATES = 100
TOP = 20
STORED = local.capacity("rootsift", 32)  # 227 features in 8 KB
GRID = {"min_inliers": (8, 10, 12, 15, 20), "min_coverage": (0.0, 0.03, 0.06, 0.1), "weight": (0.1, 0.2, 0.3, 0.5),
        "cap": (20, 40)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def embed_all(repo: Path, paths: list[Path], cache: Path, maps: bool = False):
    """Global descriptors of the repository's default embedder (cached by model and paths); with
    `maps`, also its conv maps (`region_map`, float16) for the CNN's local features."""
    vdir = resolve_version(repo, "embedder") if (repo / "embedder").is_dir() else repo
    meta = ModelRecord.read(vdir).to_dict()
    key = hashlib.sha256(((vdir / "model.onnx").read_bytes()[:1 << 20]) + "\n".join(map(str, paths)).encode()).hexdigest()[:12]
    f = cache / f"global-{key}{'-maps' if maps else ''}.npz"
    if f.is_file():
        data = np.load(f)
        vecs = dict(zip(data["paths"], data["vectors"], strict=True))
        return (vecs, dict(zip(data["paths"], data["maps"], strict=True))) if maps else vecs
    model = OfflineEmbedder(vdir / "model.onnx", int(meta["input_size"]), threads=2)
    rows, cmaps = [], []
    names = ["embeddings", "region_map"] if maps else ["embeddings"]
    for i, out in model.batches(paths, 32, names):
        rows.append(out[0])
        if maps:
            cmaps.append(out[1].astype(np.float16))
        if (i // 32) % 20 == 0:
            log(f"  global {vdir}: {i + len(out[0])}/{len(paths)}")
    vecs = np.concatenate(rows)
    extra = {"maps": np.concatenate(cmaps)} if maps else {}
    np.savez(f, paths=np.array([str(p) for p in paths]), vectors=vecs, **extra)
    vd = dict(zip(map(str, paths), vecs, strict=True))
    return (vd, dict(zip(map(str, paths), extra["maps"], strict=True))) if maps else vd


def extract_all(paths: list[Path], cache: Path, kind: str, side: int = local.MAX_SIDE
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw local features of each image (extracted at most `side` px on the longer side), strongest
    first: RootSIFT [n, 128] float16 or ORB [n, 32] uint8."""
    key = hashlib.sha256(("\n".join(map(str, paths)) + kind + str(side)).encode()).hexdigest()[:12]
    f = cache / f"local-{kind}-{side}-{key}.npz"
    if f.is_file():
        data = np.load(f, allow_pickle=True)
        return data["rows"].item()
    ext = local.RootSift(packaged=False, max_side=side) if kind == "rootsift" else local.Orb()
    rows = {}
    t0 = time.perf_counter()
    for n, p in enumerate(paths):
        img = np.asarray(decode_image(p.read_bytes()))
        if kind == "rootsift":
            xy, d = ext.raw(img)
            rows[str(p)] = (xy, d.astype(np.float16))
        else:
            feats = ext(img)
            rows[str(p)] = (feats.xy, feats.desc)
        if n % 500 == 0:
            log(f"  {kind}: {n}/{len(paths)}, {(time.perf_counter() - t0) / (n + 1) * 1000:.1f} ms/image")
    np.savez(f, rows=np.array(rows, dtype=object))
    return rows


def fit_pca(raw: dict, photos: list[datasets.Photo], dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([raw[str(p.path)][1][:300].astype(np.float32) for p in photos[::4]])
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim].T.astype(np.float32)


class Extractor:
    """Variant of the local features: which raw features, how many, projected how."""

    def __init__(self, name: str, raw: dict, kind: str, stored: int, query: int, pca=None, query_raw=None):
        self.name, self.raw, self.kind, self.stored, self.query, self.pca = name, raw, kind, stored, query, pca
        self.query_raw = query_raw or raw  # the queries' own extraction (e.g. at a smaller side)

    def features(self, path: Path, n: int, query: bool = False) -> local.Features:
        xy, d = (self.query_raw if query else self.raw)[str(path)]
        if self.kind == "orb":
            return local.Features("orb", xy[:n], d[:n])
        d = d[:n].astype(np.float32)
        if self.pca is not None:
            d = (d - self.pca[0]) @ self.pca[1]
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-7
        return local.Features("rootsift", xy[:n], np.clip(np.round(d * 127), -127, 127).astype(np.int8))


class CnnExtractor(Extractor):
    """DELF-style: the strongest cells of the embedder's own conv map (local.cnn_features)."""

    def __init__(self, name: str, maps: dict, sizes: dict, dim: int = 64):
        super().__init__(name, {}, "cnn", local.capacity("cnn", dim), 100)
        self.maps, self.sizes, self.dim = maps, sizes, dim

    def features(self, path: Path, n: int, query: bool = False) -> local.Features:
        w, h = self.sizes[str(path)]
        return local.cnn_features(self.maps[str(path)].astype(np.float32), w, h, self.dim, min(n, 100))


def image_area(path: Path) -> tuple[float, float]:
    from visearch.imaging import image_size

    w, h = image_size(path.read_bytes())
    return float(w), float(h)


def checks_for(proto: Protocol, glob: dict, ext: Extractor, sizes: dict) -> dict:
    """Per query: the global top N (indexes, scores, vectors) and the verifications of its top TOP."""
    q = np.stack([glob[str(p.path)] for p in proto.queries])
    db = np.stack([glob[str(p.path)] for p in proto.database])
    scores = q @ db.T
    order = np.argsort(-scores, axis=1, kind="stable")
    cache: dict[int, local.Features] = {}
    out = []
    t0 = time.perf_counter()
    for qi, qp in enumerate(proto.queries):
        cand = order[qi, :N_CANDIDATES]
        fq = ext.features(qp.path, ext.query, query=True)
        feats = {}
        for j, di in enumerate(cand[:TOP]):
            if int(di) not in cache:
                cache[int(di)] = ext.features(proto.database[int(di)].path, ext.stored)
            feats[j] = cache[int(di)]
        checks = local.verify_top(fq, feats, TOP)
        boxes = {j: (0.0, 0.0, *sizes[str(proto.database[int(di)].path)]) for j, di in enumerate(cand[:TOP])}
        out.append({"cand": cand, "scores": scores[qi, cand], "vectors": db[cand], "query": q[qi], "checks": checks,
                    "boxes": boxes, "area": float(np.prod(sizes[str(qp.path)])), "rest": order[qi, N_CANDIDATES:],
                    "positives": proto.positives(qp)})
    ms = (time.perf_counter() - t0) / max(1, len(proto.queries)) * 1000
    return {"rows": out, "ms_per_query": ms}


def ranked_by(row: dict, method: str, params: local.VerifyParams | None) -> tuple[np.ndarray, local.Ranked | None]:
    if method == "global":
        return row["cand"], None
    if method == "qe":
        q2 = regions.alpha_qe(row["query"], row["vectors"], row["scores"], 5, 3.0)
        return row["cand"][np.argsort(-(row["vectors"] @ q2), kind="stable")], None
    r = local.fuse(row["query"], row["vectors"], row["scores"], row["checks"], row["boxes"], row["area"], params)
    return row["cand"][r.order], r


def score(res: dict, method: str, params: local.VerifyParams | None = None) -> dict:
    aps, ap20, r1, r5 = [], [], [], []
    for row in res["rows"]:
        ranked, _ = ranked_by(row, method, params)
        rel = [int(i) in row["positives"] for i in np.concatenate([ranked, row["rest"]])]
        n = len(row["positives"])
        aps.append(average_precision(rel, n))
        ap20.append(average_precision(rel[:20], n, k=20))
        r1.append(rel[0])
        r5.append(any(rel[:5]))
    return {"mAP": float(np.mean(aps)), "mAP@20": float(np.mean(ap20)), "R@1": float(np.mean(r1)),
            "R@5": float(np.mean(r5))}


def match_stats(res: dict, params: local.VerifyParams) -> tuple[list, list]:
    """(pairs, top1): (fused score, verified, relevant) of every verified top-TOP candidate and of each top-1."""
    pairs, top1 = [], []
    for row in res["rows"]:
        ranked, r = ranked_by(row, "verify", params)
        for k, i in enumerate(r.order[:TOP]):
            if int(i) in r.verified:
                pairs.append((float(r.scores[k]), int(row["cand"][i]) in row["positives"]))
        i0 = int(r.order[0])
        top1.append((float(r.scores[0]), i0 in r.verified, int(row["cand"][i0]) in row["positives"]))
    return pairs, top1


def pick_threshold(pairs: list, target: float = 0.95) -> tuple[float, list]:
    """The lowest fused score above which verified pairs are right >= target of the time; the curve."""
    pairs = sorted(pairs, key=lambda p: -p[0])
    curve, best = [], None
    tp = 0
    total = sum(1 for _, y in pairs if y) or 1
    for k, (s, y) in enumerate(pairs, 1):
        tp += y
        prec = tp / k
        curve.append((s, prec, tp / total))
    for s, prec, _ in curve:  # scanning down: the last score where precision still holds
        if prec >= target:
            best = s
    return (best if best is not None else float("inf")), curve


def top1_report(top1: list, threshold: float) -> dict:
    flagged = [y for s, v, y in top1 if v and s >= threshold]
    return {"precision": float(np.mean(flagged)) if flagged else float("nan"), "coverage": len(flagged) / max(1, len(top1))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="eval", choices=("eval", "fit-pca"))
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--selection-model", type=Path, help="a second repository whose TH rankings take part in selection")
    ap.add_argument("--out", type=Path, default=Path("runs/verify"))
    ap.add_argument("--smoke", action="store_true", help="a few queries per protocol (CI)")
    ap.add_argument("--write-params", action="store_true", help="write <served version>/verify.json")
    ap.add_argument("--side", type=int, default=local.MAX_SIDE, help="RootSIFT extracted at most this many px")
    ap.add_argument("--query-side", type=int, default=local.QUERY_SIDE,
                    help="the queries' RootSIFT extracted at most this many px, as the gateway asks (0: as --side)")
    ap.add_argument("--extractors", default="rootsift,orb,rootsift-1000,cnn")
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        raise SystemExit("the Grocery Store dataset is not at ../shared/data/grocery-store")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    protos = get_protocols(root, ("TH", "P1", "P3"))
    if args.smoke:
        protos = {k: v.limited(4, 6) for k, v in protos.items()}
    from visearch.scenes import build_scenes

    scenes = build_scenes(root, args.out / "scenes")
    products = [p for p in datasets.grocery_split(root, "val") if p.is_product]
    protos["S"] = Protocol("S", products if not args.smoke else products[:4], [s.photo for s in scenes],
                           "val product photos -> the 81 iconic images pasted small into shop photos")
    paths = sorted({p.path for pr in protos.values() for p in (*pr.queries, *pr.database)}, key=str)
    sift = extract_all(paths, cache, "rootsift")
    if args.command == "fit-pca":
        th = get_protocols(root, ("TH",))["TH"]
        mean, w = fit_pca(sift, th.database)
        local.PCA_FILE.parent.mkdir(exist_ok=True)
        np.savez(local.PCA_FILE, mean=mean, w=w)
        log(f"wrote {local.PCA_FILE} sha256 {hashlib.sha256(local.PCA_FILE.read_bytes()).hexdigest()}")
        return
    wanted = args.extractors.split(",")
    if args.side != local.MAX_SIDE:
        sift = extract_all(paths, cache, "rootsift", args.side)
    qpaths = sorted({p.path for pr in protos.values() for p in pr.queries}, key=str)
    qsift = extract_all(qpaths, cache, "rootsift", args.query_side) if args.query_side else sift
    qname = f" query@{args.query_side}" if args.query_side else ""
    orb = extract_all(paths, cache, "orb") if "orb" in wanted else {}
    sizes = {str(p): image_area(p) for p in paths}
    pca = local.load_pca()
    extractors = [e for e in (
        Extractor(f"rootsift-pca32@{args.side}{qname}", sift, "rootsift", STORED, local.QUERY_FEATURES, pca, qsift),
        Extractor("orb", orb, "orb", local.capacity("orb", 32), local.QUERY_FEATURES),
        Extractor(f"rootsift-1000@{args.side} (unbudgeted)", sift, "rootsift", 1000, 1000))
        if {"rootsift-pca32": "rootsift", "rootsift-1000": "rootsift-1000"}.get(e.name.split("@")[0], e.name) in wanted]
    served, maps = embed_all(args.model, paths, cache, maps=True)
    if "cnn" in wanted:
        extractors.append(CnnExtractor("cnn", maps, sizes))
    models = {"served": served}
    if args.selection_model:
        models["selection"] = embed_all(args.selection_model, paths, cache)
    base = local.VerifyParams()
    results: dict = {"params": {}, "rows": [], "ms_per_query": {}}
    chosen = None
    for ext in extractors:
        res = {(m, n): checks_for(protos[n], g, ext, sizes) for m, g in models.items() for n in protos
               if m == "served" or n == "TH"}
        for key, r in res.items():
            results["ms_per_query"][f"{ext.name} {key[0]} {key[1]}"] = round(r["ms_per_query"], 1)
        grid = [replace(base, **dict(zip(GRID, vals, strict=True))) for vals in itertools.product(*GRID.values())]
        sel = [k for k in res if k[1] == "TH"]
        best = max(grid, key=lambda p: np.mean([score(res[k], "verify", p)["mAP@20"] for k in sel]))
        pooled = [pr for k in sel for pr in match_stats(res[k], best)[0]]
        threshold, curve = pick_threshold(pooled)
        best = replace(best, threshold=float(threshold), match_on="fused", extractor=ext.name,
                       selected_on="TH (" + " + ".join(k[0] for k in sel) + ")",
                       curve=[(round(s, 4), round(p, 4), round(r, 4)) for s, p, r in curve[::max(1, len(curve) // 40)]])
        results["params"][ext.name] = {k: v for k, v in asdict(best).items() if k != "curve"}
        if chosen is None:
            chosen = (ext, best, res)
        for (m, n), r in res.items():
            if m != "served":
                continue
            for method in ("global", "qe", "verify"):
                row = {"extractor": ext.name, "protocol": n, "method": method,
                       **score(r, method, best if method == "verify" else None)}
                if method == "verify":
                    row["match"] = top1_report(match_stats(r, best)[1], best.threshold)
                results["rows"].append(row)
                log(f"{ext.name:<26} {n:<3} {method:<7} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                  if isinstance(v, float)))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    ext, best, res = chosen
    md = ["| extractor | protocol | method | mAP | mAP@20 | R@1 | R@5 | match precision / coverage (top-1) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        m = r.get("match")
        md.append(f"| {r['extractor']} | {r['protocol']} | {r['method']} | {r['mAP']:.3f} | {r['mAP@20']:.3f} | "
                  f"{r['R@1']:.2f} | {r['R@5']:.2f} | " + (f"{m['precision']:.3f} / {m['coverage']:.2f}" if m else "") + " |")
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    draw_curve(res, best, args.out / "curve-P1.png")
    draw_correspondences(protos["P1"], res[("served", "P1")], ext, best, args.out / "correspondences.jpg")
    if args.write_params:
        vdir = resolve_version(args.model, "embedder")
        best.write(vdir / "verify.json")
        log(f"wrote {vdir / 'verify.json'}")
    print("\n".join(md))


def draw_curve(res: dict, params: local.VerifyParams, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in ("TH", "P1", "P3"):
        if ("served", name) not in res:
            continue
        _, curve = pick_threshold(match_stats(res[("served", name)], params)[0])
        ax.plot([c[2] for c in curve], [c[1] for c in curve], label=name)
    ax.axhline(0.95, color="grey", lw=0.5)
    ax.set_xlabel("recall of verified pairs")
    ax.set_ylabel("precision")
    ax.set_title(f"fused score >= t (chosen t = {params.threshold:.3f} on TH)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def draw_correspondences(proto: Protocol, res: dict, ext: Extractor, params: local.VerifyParams, out: Path,
                         n: int = 4) -> None:
    """Queries beside their top verified hit, inlier correspondences drawn (green: a match)."""
    import cv2

    rows = []
    for qi, row in enumerate(res["rows"]):
        _, r = ranked_by(row, "verify", params)
        i0 = int(r.order[0])
        if i0 not in r.verified:
            continue
        qimg = np.asarray(decode_image(proto.queries[qi].path.read_bytes()))
        cimg = np.asarray(decode_image(proto.database[int(row["cand"][i0])].path.read_bytes()))
        h = max(qimg.shape[0], cimg.shape[0])
        canvas = np.full((h, qimg.shape[1] + cimg.shape[1], 3), 255, np.uint8)
        canvas[:qimg.shape[0], :qimg.shape[1]] = qimg
        canvas[:cimg.shape[0], qimg.shape[1]:] = cimg
        good = int(row["cand"][i0]) in row["positives"]
        for x1, y1, x2, y2 in r.checks[i0].pairs[:60]:
            cv2.line(canvas, (int(x1), int(y1)), (int(x2) + qimg.shape[1], int(y2)),
                     (0, 200, 0) if good else (220, 0, 0), 1, cv2.LINE_AA)
        rows.append(cv2.resize(canvas, (int(canvas.shape[1] * 300 / h), 300)))
        if len(rows) >= n:
            break
    if rows:
        width = max(r.shape[1] for r in rows)
        sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
        cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])


if __name__ == "__main__":
    main()
