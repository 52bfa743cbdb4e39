"""Detection, measured in one run: box AP, object-in-scene retrieval with and without the crop, cost.

    python -m bench.detect_eval --model model_repository --out runs/detect [--smoke]

Every served detector version of --model (1: COCO SSD-MobileNetV2 converted from its
frozen graph, class-agnostic; 2: the same network fine-tuned on composited scenes) runs
through ONNX Runtime with the detection service's own post-processing (visearch.detector).
- Box AP@0.5 (and @0.75) on held-aside composites: val product photos pasted into val shop
  photos (visearch.composites, split "val", a seed the training never used).
- Object-in-scene retrieval, protocol O: catalog = the 81 iconic images (clean objects,
  embedded whole); queries = each val product photo pasted small (20-40 % of the side, off
  centre, rotated, partly cut by the border) into a val shop photo of fruit or vegetables.
  R@1 and mAP of the served embedder on: the full frame, the best box of each detector
  (full frame when it finds nothing), the true box (the ceiling a perfect detector gives).
- The grocery protocols P1 and P3 with the query cropped to the best box (the database as
  ingested by default: whole images), against the full frame.
- Cost: milliseconds per image for detection (decode excluded, resize + forward + NMS) and
  for the embedding forward, interleaved in the same run, one ONNX Runtime thread each.
Writes results.json, results.md and examples.jpg (query with the detected box in green and
the true box in white, the top match with the full frame and with the crop) into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visearch import composites, datasets
from visearch import detector as det
from visearch.evaluation.harness import MAP_AT, order_metrics
from visearch.evaluation.protocols import Protocol, get_protocols
from visearch.inference import OnnxRuntimeBackend, resolve_version
from visearch.models.record import ModelRecord
from visearch.offline import OfflineEmbedder

ROOT = Path(__file__).resolve().parents[1]

QUERY_SCALE = (0.20, 0.40)
AP_SEED, QUERY_SEED = 100, 7
SMALL = 0.5  # "best if small": crop only when the box covers less than this share of the photo


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Embedder:
    def __init__(self, repo: Path, threads: int):
        vdir = resolve_version(repo, "embedder")
        self.meta = ModelRecord.read(vdir).to_dict()
        self.model = OfflineEmbedder(vdir / "model.onnx", self.meta["input_size"], threads, "embeddings")
        self.session = self.model.session
        self.size = self.meta["input_size"]

    def __call__(self, images: list[Image.Image], boxes: list | None = None, batch: int = 16) -> np.ndarray:
        return self.model.embed_images(images, boxes, batch)


def detectors(repo: Path, threads: int, only: list[str] | None) -> dict[str, det.Detector]:
    versions = sorted(int(p.name) for p in (repo / "detector").glob("*") if (p / "model.onnx").is_file())
    out = {}
    for v in versions:
        name = ModelRecord.read(repo / "detector" / str(v)).id
        if only and str(v) not in only:
            continue
        out[f"v{v} {name}"] = det.Detector(OnnxRuntimeBackend(repo, {"detector": str(v)}, threads))
    if not out:
        raise SystemExit(f"no detector built in {repo}: run `visearch models build`")
    return out


def run_detector(d: det.Detector, images: list[Image.Image], min_score: float) -> list[list[det.Box]]:
    async def go():
        out = []
        for s in range(0, len(images), 8):
            out += await d.detect(images[s:s + 8], min_score=min_score, iou=0.5, limit=20)
        return out

    return asyncio.run(go())


def box_ap(dets: dict[str, det.Detector], scenes: list[composites.Composite]) -> dict:
    images = [Image.open(c.path).convert("RGB") for c in scenes]
    truths = [np.array(c.boxes, float).reshape(-1, 4) for c in scenes]
    out = {}
    for name, d in dets.items():
        found = run_detector(d, images, 0.05)
        pairs = [(np.array([b.xyxy for b in f]).reshape(-1, 4), np.array([b.score for b in f])) for f in found]
        out[name] = {"AP50": round(composites.average_precision(pairs, truths, 0.5), 4),
                     "AP75": round(composites.average_precision(pairs, truths, 0.75), 4),
                     "scenes": len(scenes), "objects": int(sum(len(t) for t in truths))}
        log(f"  box AP {name}: AP@0.5 {out[name]['AP50']:.3f}  AP@0.75 {out[name]['AP75']:.3f}")
    return out


def object_queries(root: Path, out_dir: Path, n: int | None, seed: int = QUERY_SEED):
    """One scene per val product photo: the photo pasted small into a val fruit/vegetable photo."""
    val = datasets.grocery_split(root, "val")
    products = [p for p in val if p.is_product][: n or None]
    backgrounds = [p for p in val if not p.is_product]
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(products):
        bg = Image.open(backgrounds[int(rng.integers(len(backgrounds)))].path).convert("RGB")
        img, boxes = composites.make_composite(rng, bg, [(Image.open(p.path).convert("RGB"), None)], size=300,
                                               scale=QUERY_SCALE)
        path = out_dir / f"query-{i:03d}.jpg"
        img.save(path, quality=92)
        rows.append((p, path, tuple(boxes[0]) if len(boxes) else (0.0, 0.0, 300.0, 300.0)))
    return rows


def retrieval(label: str, scores: np.ndarray, proto: Protocol) -> dict:
    """Metrics of a query x database score matrix (inner products, or the best of several views)."""
    m = order_metrics(proto, np.argsort(-scores, axis=1, kind="stable"))
    row = {k: round(m[k], 4) for k in ("mAP", f"mAP@{MAP_AT}", "recall@1", "recall@5")} | {"n_queries": m["n_queries"]}
    log(f"  {proto.name:2} {label:44} mAP {row['mAP']:.3f} R@1 {row['recall@1']:.3f}")
    return row


def policies(name: str, images, boxes, q_full: np.ndarray, db: np.ndarray, emb, proto: Protocol) -> dict:
    """The gateway's query policies with one detector: the best box ("best"), the better of the box
    and the full frame per database item ("both"), and the box only when it covers under half the
    photo ("best if small")."""
    q_crop = emb(images, boxes)
    full_s, crop_s = q_full @ db.T, q_crop @ db.T
    small = np.array([b is not None and (b[2] - b[0]) * (b[3] - b[1]) < SMALL * im.width * im.height
                      for b, im in zip(boxes, images, strict=True)])
    found = float(np.mean([b is not None for b in boxes]))
    return {f"best box: {name}": retrieval(f"best box: {name}", crop_s, proto) | {"found_rate": round(found, 3)},
            f"both (max): {name}": retrieval(f"both (max): {name}", np.maximum(full_s, crop_s), proto),
            f"best if small: {name}": retrieval(f"best if small: {name}", np.where(small[:, None], crop_s, full_s), proto)
            | {"cropped_rate": round(float(small.mean()), 3)}}


def best_boxes(found: list[list[det.Box]]) -> list[tuple | None]:
    return [f[0].xyxy if f else None for f in found]


def catalog_objects(root: Path, dets: dict[str, det.Detector], emb, out: Path, smoke: bool) -> dict:
    """Protocol S of bench/rerank_eval.py (val product photos -> the 81 iconic images pasted at 25-40 %
    into shop photos), with the catalog ingested as the worker does: the full frame and up to 3
    detected objects per scene, a scene scoring its best object. Also: for each query, the box of
    the true scene's best-matching object against the pasted object's true box (what a hit's box
    shows the client), beside the whole frame's IoU."""
    from visearch.scenes import build_scenes

    scenes = build_scenes(root, ROOT / ".data" / "scenes")
    queries = [p for p in datasets.grocery_split(root, "val") if p.is_product][: 6 if smoke else None]
    proto = Protocol("S", queries, [s.photo for s in scenes], "val product photos -> iconic pasted small into shop photos")
    imgs = [Image.open(s.photo.path).convert("RGB") for s in scenes]
    truth = np.array([s.box for s in scenes])
    q = emb([Image.open(p.path).convert("RGB") for p in queries])
    full = emb(imgs)
    out_rows = {"full frame only": retrieval("full frame only", q @ full.T, proto)}
    frame_iou = [det.box_iou(np.array([[0, 0, im.width, im.height]]), truth[i:i + 1])[0, 0] for i, im in enumerate(imgs)]
    for name, d in dets.items():
        found = run_detector(d, imgs, 0.3)
        owner, boxes = [], []
        for i, (im, f) in enumerate(zip(imgs, found, strict=True)):
            for b in [(0.0, 0.0, float(im.width), float(im.height))] + [x.xyxy for x in f[:3]]:
                owner.append(i)
                boxes.append(b)
        owner = np.array(owner)
        vecs = emb([imgs[i] for i in owner], boxes)
        obj_scores = q @ vecs.T
        scene_scores = np.full((len(q), len(imgs)), -np.inf)
        np.maximum.at(scene_scores.T, owner, obj_scores.T)
        row = retrieval(f"full frame + detected: {name}", scene_scores, proto)
        ious, matched = [], []
        for qi, p in enumerate(queries):
            t = next(iter(proto.positives(p)))
            mine = np.flatnonzero(owner == t)
            best = mine[int(np.argmax(obj_scores[qi, mine]))]
            ious.append(det.box_iou(np.array([boxes[best]]), truth[t:t + 1])[0, 0])
            matched.append((p, t, boxes[best]))
        if name == list(dets)[-1]:
            draw_matches(matched, imgs, truth, np.argmax(scene_scores, 1), out / "examples-S.jpg")
        row |= {"objects_per_scene": round(len(owner) / len(imgs), 2), "matched_box_mean_iou": round(float(np.mean(ious)), 3),
                "matched_box_iou>=0.5": round(float(np.mean(np.array(ious) >= 0.5)), 3)}
        log(f"    matched object's box vs truth: mean IoU {row['matched_box_mean_iou']}, "
            f"IoU>=0.5 {row['matched_box_iou>=0.5']} ({row['objects_per_scene']} objects per scene)")
        out_rows[f"full frame + detected: {name}"] = row
    out_rows["whole frame IoU"] = {"mean_iou": round(float(np.mean(frame_iou)), 3)}
    return out_rows


def draw_matches(matched, imgs, truth, top, out: Path, n: int = 8) -> None:
    """Query | its true scene with the best-matching stored object's box (green) and the pasted
    object's true box (white); a green frame when that scene is the top hit."""
    from PIL import ImageDraw

    cell = 220
    picks = list(range(len(matched)))[:: max(1, len(matched) // n)][:n]
    grid = Image.new("RGB", (2 * cell, len(picks) * cell), "white")
    for r, i in enumerate(picks):
        q, t, box = matched[i]
        grid.paste(Image.open(q.path).convert("RGB").resize((cell, cell)), (0, r * cell))
        scene = imgs[t].copy()
        d = ImageDraw.Draw(scene)
        d.rectangle(tuple(truth[t]), outline="white", width=2)
        d.rectangle(tuple(box), outline=(0, 220, 0), width=3)
        tile = scene.resize((cell, cell))
        ImageDraw.Draw(tile).rectangle((0, 0, cell - 1, cell - 1), outline=(0, 200, 0) if top[i] == t else (220, 0, 0),
                                       width=4)
        grid.paste(tile, (cell, r * cell))
    grid.save(out, quality=90)


def timing(dets: dict[str, det.Detector], emb: Embedder, images: list[Image.Image], repeats: int = 3) -> dict:
    """ms per image, batch 1, interleaved: detection (resize + forward + NMS) and the embedding forward."""
    best: dict[str, float] = {}

    def once(name: str) -> float:
        t0 = time.perf_counter()
        for im in images:
            if name == "embedding":
                emb([im])
            else:
                asyncio.run(dets[name].detect([im]))
        return (time.perf_counter() - t0) * 1000 / len(images)

    names = [*dets, "embedding"]
    for name in names:
        once(name)  # warm-up
    for _ in range(repeats):
        for name in names:
            best[name] = min(best.get(name, 1e9), once(name))
    return {k: round(v, 2) for k, v in best.items()}


def draw(rows, found, truth_boxes, top_full, top_crop, catalog, out: Path, n: int = 8) -> None:
    from PIL import ImageDraw

    cell = 200
    picks = list(range(len(rows)))[:: max(1, len(rows) // n)][:n]
    grid = Image.new("RGB", (3 * cell, len(picks) * cell), "white")
    for r, i in enumerate(picks):
        q = Image.open(rows[i][1]).convert("RGB")
        d = ImageDraw.Draw(q)
        d.rectangle(truth_boxes[i], outline="white", width=2)
        if found[i]:
            d.rectangle(found[i][0].xyxy, outline=(0, 220, 0), width=3)
        grid.paste(q.resize((cell, cell)), (0, r * cell))
        for c, top in ((1, top_full), (2, top_crop)):
            match = catalog[top[i]]
            tile = Image.open(match.path).convert("RGB").resize((cell, cell))
            ok = match.fine_id == rows[i][0].fine_id
            ImageDraw.Draw(tile).rectangle((0, 0, cell - 1, cell - 1), outline=(0, 200, 0) if ok else (220, 0, 0), width=5)
            grid.paste(tile, (c * cell, r * cell))
    grid.save(out, quality=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "detect")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per session")
    ap.add_argument("--versions", default="", help="detector versions to measure, comma-separated (default: all)")
    ap.add_argument("--smoke", action="store_true", help="a handful of scenes and queries, no P1/P3")
    ap.add_argument("--parts", default="ap,o,s,grocery,cost", help="what to measure, comma-separated")
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        raise SystemExit("the grocery dataset is needed: set VISEARCH_GROCERY_DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dets = detectors(args.model, args.threads, [v for v in args.versions.split(",") if v] or None)
    emb = Embedder(args.model, args.threads)
    report: dict = {"model": str(args.model), "detectors": list(dets), "embedder": emb.meta.get("id"),
                    "command": "python -m bench.detect_eval " + " ".join(argv if argv is not None else sys.argv[1:])}

    parts = set(args.parts.split(","))
    if "ap" in parts:
        log("box AP on held-aside composites")
        n_ap = 12 if args.smoke else 300
        scenes = composites.build_composites(root, args.out / "ap-scenes", "val", n_ap, AP_SEED)
        report["box_ap"] = box_ap(dets, scenes)

    if "o" in parts:
        log("object-in-scene retrieval (O): val products pasted small into val shop photos -> iconic catalog")
        rows = object_queries(root, args.out / "o-queries", 6 if args.smoke else None)
        catalog = datasets.grocery_iconic(root)
        proto = Protocol("O", [r[0] for r in rows], catalog, "val product photos pasted small into shop photos -> iconic")
        cat = emb([Image.open(p.path).convert("RGB") for p in catalog])
        images = [Image.open(r[1]).convert("RGB") for r in rows]
        truth = [r[2] for r in rows]
        q_full = emb(images)
        o = {"full frame": retrieval("full frame", q_full @ cat.T, proto)}
        found_by = {}
        for name, d in dets.items():
            found = run_detector(d, images, 0.3)
            found_by[name] = found
            boxes = best_boxes(found)
            o |= policies(name, images, boxes, q_full, cat, emb, proto)
            hits = [b is not None and det.box_iou(np.array([b]), np.array([t]))[0, 0] >= 0.5 for b, t in zip(boxes, truth,
                                                                                                              strict=True)]
            o[f"best box: {name}"]["best_box_iou>=0.5"] = round(float(np.mean(hits)), 3)
        o["crop: true box"] = retrieval("crop: true box", emb(images, truth) @ cat.T, proto)
        report["object_in_scene"] = o
        best_name = max(dets, key=lambda n: o[f"best box: {n}"]["recall@1"])
        q_crop = emb(images, best_boxes(found_by[best_name]))
        draw(rows, found_by[best_name], truth, np.argmax(q_full @ cat.T, 1), np.argmax(q_crop @ cat.T, 1), catalog,
             args.out / "examples.jpg")

    if "s" in parts:
        log("S: catalog scenes with the object small (the re-rank benchmark's), stored as full frame + detected objects")
        report["catalog_objects"] = catalog_objects(root, dets, emb, args.out, args.smoke)

    if not args.smoke and "grocery" in parts:
        report["grocery"] = {}
        for pname, p in get_protocols(root, ("P1", "P3")).items():
            log(f"{pname}: query cropped to the best box vs the full frame")
            db = emb([Image.open(x.path).convert("RGB") for x in p.database])
            q_imgs = [Image.open(x.path).convert("RGB") for x in p.queries]
            q_full_p = emb(q_imgs)
            rows_p = {"full frame": retrieval("full frame", q_full_p @ db.T, p)}
            for name, d in dets.items():
                rows_p |= policies(name, q_imgs, best_boxes(run_detector(d, q_imgs, 0.3)), q_full_p, db, emb, p)
            report["grocery"][pname] = rows_p

    if "cost" in parts:
        log("cost per image")
        photos = [Image.open(p.path).convert("RGB") for p in datasets.grocery_split(root, "val")[::7]]
        report["ms_per_image"] = timing(dets, emb, photos[:6] if args.smoke else photos[:40])
        log(f"  {report['ms_per_image']}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(markdown(report))
    log(f"wrote {args.out / 'results.json'}, results.md, examples.jpg in {report['seconds']}s")
    return 0


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}`", "", "| detector | box AP@0.5 | box AP@0.75 |", "|---|---|---|"]
    lines += [f"| {k} | {v['AP50']:.3f} | {v['AP75']:.3f} |" for k, v in r.get("box_ap", {}).items()]
    lines += ["", "| protocol | query | mAP | R@1 | R@5 |", "|---|---|---|---|---|"]
    for pname, rows in [("O", r.get("object_in_scene", {})), ("S", r.get("catalog_objects", {})),
                        *r.get("grocery", {}).items()]:
        lines += [f"| {pname} | {k} | {v['mAP']:.3f} | {v['recall@1']:.3f} | {v['recall@5']:.3f} |" for k, v in rows.items()
                  if "mAP" in v]
    if "catalog_objects" in r:
        lines += ["", "S, the box of the true scene's best-matching object vs the pasted object: "
                  + "; ".join(f"{k}: mean IoU {v['matched_box_mean_iou']}, IoU>=0.5 {v['matched_box_iou>=0.5']}"
                              for k, v in r["catalog_objects"].items() if "matched_box_mean_iou" in v)
                  + f"; whole frame: mean IoU {r['catalog_objects']['whole frame IoU']['mean_iou']}"]
    if "ms_per_image" in r:
        lines += ["", "| ms per image (1 thread, batch 1) | " + " | ".join(r["ms_per_image"]) + " |",
                  "|---|" + "---|" * len(r["ms_per_image"]),
                  "| | " + " | ".join(f"{v:.1f}" for v in r["ms_per_image"].values()) + " |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
