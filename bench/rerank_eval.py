"""Re-ranking, measured in one run: global only, + max over base regions, + QAM, + alpha-QE, + DBA.

    python -m bench.rerank_eval --model model_repository --out runs/rerank [--cd-model DIR] [--smoke]

Runs the served embedder ONNX (all its outputs) through ONNX Runtime on the grocery
protocols P1, P3 (and CD with --cd-model, a model that never saw products 44..58) and
on the object-in-scene protocol S (val product photos -> the 81 iconic images pasted
small into real shop photos, visearch.scenes), then re-ranks each query's global top N
(default 100) with each method of visearch.regions, exactly as the re-rank service does.
Writes `results.json`, `results.md` and `examples-S.jpg` (query, the best match by QAM
with its merged region box in yellow, the true scene with the box QAM finds there; the
pasted object's true box in white) into --out, and for S how well the region boxes
cover the pasted object. Parameters are fixed beforehand, from the literature
(alpha-QE k=5, alpha=3; DBA k=3, alpha=3; OSPP 3 levels + 8 FMP regions), not tuned
on these rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from visearch import datasets, regions
from visearch.detector import box_iou
from visearch.evaluation.harness import MAP_AT, order_metrics
from visearch.evaluation.protocols import Protocol, get_protocols
from visearch.inference import resolve_version
from visearch.models.record import ModelRecord
from visearch.offline import OfflineEmbedder, load_batch
from visearch.scenes import build_scenes

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("global", "regions", "qam", "qe", "dba")
QE_K, QE_ALPHA, DBA_K, DBA_ALPHA = 5, 3.0, 3, 3.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Model:
    def __init__(self, path: Path, threads: int):
        vdir = resolve_version(path, "embedder") if (path / "embedder").is_dir() else path
        self.meta = ModelRecord.read(vdir).to_dict()
        if not self.meta.get("regions"):
            raise SystemExit(f"{vdir}: the model has no region outputs; rebuild it (visearch models build)")
        self.model = OfflineEmbedder(vdir / "model.onnx", self.meta["input_size"], threads, "embeddings")
        self.session = self.model.session
        self.size = self.meta["input_size"]
        self.outputs = ["embeddings", *self.meta["regions"]["outputs"]]
        self.cache: dict[Path, tuple] = {}

    def run(self, paths: list[Path], batch: int = 16) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache]
        t0 = time.perf_counter()
        for i, (emb, rmap, energy, rq) in self.model.batches(todo, batch, self.outputs):
            part = todo[i:i + batch]
            for j, p in enumerate(part):
                self.cache[p] = (emb[j], rq[j], regions.base_regions(rmap[j], energy[j]))
            if (i // batch) % 20 == 0:
                log(f"  {i + len(part)}/{len(todo)} images, {time.perf_counter() - t0:.0f}s")

    def matrices(self, photos: list) -> tuple[np.ndarray, np.ndarray, list]:
        rows = [self.cache[p.path] for p in photos]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), [r[2] for r in rows]


def rerank(method: str, qi: int, order: np.ndarray, q: np.ndarray, db: np.ndarray, dba_db: np.ndarray | None,
           qr: np.ndarray, db_regions: list, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The new order of the top `n` of `order` (then the rest unchanged) and, for region methods, a box per candidate."""
    top, rest = order[:n], order[n:]
    if method == "global":
        return order, None
    if method == "qe":
        scores = db[top] @ q
        expanded = regions.alpha_qe(q, db[top], scores, QE_K, QE_ALPHA)
        new = db[top] @ expanded
        boxes = None
    elif method in ("regions", "qam"):
        new, boxes = np.empty(len(top)), np.empty((len(top), 4), np.float32)
        for i, d in enumerate(top):
            new[i], boxes[i] = regions.match(method, qr, db_regions[d].features, db_regions[d].boxes)
    else:
        raise ValueError(method)
    perm = np.argsort(-new, kind="stable")
    return np.concatenate([top[perm], rest]), (boxes[perm] if boxes is not None else None)


def metrics(proto: Protocol, orders: np.ndarray) -> dict:
    m = order_metrics(proto, orders)
    return {"mAP": round(m["mAP"], 4), f"mAP@{MAP_AT}": round(m[f"mAP@{MAP_AT}"], 4),
            **{f"recall@{k}": round(m[f"recall@{k}"], 4) for k in (1, 5, 10)}, "n_queries": m["n_queries"]}


def evaluate(model: Model, proto: Protocol, n: int, query_side: str = "graph") -> tuple[dict, dict]:
    model.run([p.path for p in (*proto.queries, *proto.database)])
    q, qr, q_regions = model.matrices(proto.queries)
    if query_side == "sum":  # the query's own whole-frame region (sum pooling, like the regions)
        qr = np.stack([r.features[0] / np.linalg.norm(r.features[0]) for r in q_regions])
    db, _, db_regions = model.matrices(proto.database)
    order = np.argsort(-(q @ db.T), axis=1, kind="stable")
    dba_db = regions.dba(db, DBA_K, DBA_ALPHA)
    out, extra = {}, {"boxes": {}, "orders": {}}
    for method in METHODS:
        t0 = time.perf_counter()
        if method == "dba":
            orders = np.argsort(-(q @ dba_db.T), axis=1, kind="stable")
            boxes = [None] * len(q)
        else:
            res = [rerank(method, i, order[i], q[i], db, dba_db, qr[i], db_regions, n) for i in range(len(q))]
            orders, boxes = np.stack([r[0] for r in res]), [r[1] for r in res]
        ms = (time.perf_counter() - t0) * 1000 / len(q)
        out[method] = metrics(proto, orders) | {"ms_per_query": round(ms, 2)}
        extra["orders"][method], extra["boxes"][method] = orders, boxes
        log(f"  {proto.name:3} {method:8} mAP {out[method]['mAP']:.3f} mAP@20 {out[method]['mAP@20']:.3f} "
            f"R@1 {out[method]['recall@1']:.2f} ({ms:.1f} ms/query)")
    return out, extra


def box_quality(proto: Protocol, extra: dict, scenes: dict, method: str) -> dict:
    """How well the box a region method returns for the TRUE scene covers the pasted object: mean IoU and
    the share of queries with IoU >= 0.3, over queries whose true scene is among the re-ranked candidates;
    the whole frame's IoU (what a global method implicitly answers) beside it."""
    ious, frame_ious = [], []
    for qi, q in enumerate(proto.queries):
        truth = next(iter(proto.positives(q)))
        order, boxes = extra["orders"][method][qi], extra["boxes"][method][qi]
        pos = np.flatnonzero(order[:len(boxes)] == truth)
        if not len(pos):
            continue
        photo = proto.database[truth]
        gt = np.array(scenes[photo.path])
        from PIL import Image

        w, h = Image.open(photo.path).size
        box = boxes[pos[0]] * np.array([w, h, w, h])
        ious.append(float(box_iou(box, gt)[0, 0]))
        frame_ious.append(float(box_iou(np.array([0, 0, w, h]), gt)[0, 0]))
    return {"n": len(ious), "mean_iou": round(float(np.mean(ious)), 3) if ious else None,
            "iou>=0.3": round(float(np.mean(np.array(ious) >= 0.3)), 3) if ious else None,
            "whole_frame_mean_iou": round(float(np.mean(frame_ious)), 3) if frame_ious else None}


def ingestion_cost(model: Model, photos: list, repeats: int = 5) -> dict:
    """Milliseconds per image: the forward with embeddings only, with every output, and + base regions.
    One warm-up each, then the variants interleaved `repeats` times; the best of each."""
    x = load_batch([p.path for p in photos], model.size)

    def once(what: str) -> float:
        t0 = time.perf_counter()
        if what == "embeddings":
            model.session.run(["embeddings"], {"images": x})
        else:
            _, rmap, energy, _ = model.session.run(model.outputs, {"images": x})
            if what == "all+regions":
                for j in range(len(x)):
                    regions.base_regions(rmap[j], energy[j])
        return time.perf_counter() - t0

    variants = ("embeddings", "all", "all+regions")
    for what in variants:
        once(what)
    best = {what: min(once(what) for _ in range(1)) for what in variants}
    for _ in range(repeats - 1):
        for what in variants:
            best[what] = min(best[what], once(what))
    return {k: round(v / len(x) * 1000, 2) for k, v in best.items()}


def draw_examples(proto: Protocol, extra: dict, scenes: dict, out: Path, n: int = 8) -> None:
    from PIL import Image, ImageDraw

    cell = 200
    picks = [i for i in range(len(proto.queries))][:: max(1, len(proto.queries) // n)][:n]
    canvas = Image.new("RGB", (cell * 3, cell * len(picks)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, qi in enumerate(picks):
        qp = proto.queries[qi]
        canvas.paste(Image.open(qp.path).convert("RGB").resize((cell, cell)), (0, row * cell))
        order, boxes = extra["orders"]["qam"][qi], extra["boxes"]["qam"][qi]
        truth = next(iter(proto.positives(qp)))
        for col, (di, box) in enumerate(((order[0], boxes[0]),
                                         (truth, boxes[int(np.flatnonzero(order[:len(boxes)] == truth)[0])]
                                          if truth in order[:len(boxes)] else None))):
            photo = proto.database[di]
            im = Image.open(photo.path).convert("RGB")
            sx, sy = cell / im.width, cell / im.height
            canvas.paste(im.resize((cell, cell)), ((col + 1) * cell, row * cell))
            x0, y0 = (col + 1) * cell, row * cell
            ok = photo.fine_id == qp.fine_id
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(0, 160, 0) if ok else (200, 0, 0), width=3)
            gt = scenes[photo.path]
            draw.rectangle([x0 + gt[0] * sx, y0 + gt[1] * sy, x0 + gt[2] * sx, y0 + gt[3] * sy], outline=(255, 255, 255),
                           width=2)
            if box is not None:
                draw.rectangle([x0 + box[0] * cell, y0 + box[1] * cell, x0 + box[2] * cell, y0 + box[3] * cell],
                               outline=(255, 200, 0), width=3)
    canvas.save(out, quality=85)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--cd-model", type=Path, default=None, help="a model trained without products 44..58, for CD")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "rerank")
    ap.add_argument("--n", type=int, default=100, help="candidates re-ranked per query")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a handful of queries per protocol")
    ap.add_argument("--protocols", default="S,P3,P1", help="of S, P3, P1 (and CD with --cd-model)")
    ap.add_argument("--ingestion-only", action="store_true", help="only time the forward with and without regions")
    ap.add_argument("--query-side", choices=("graph", "sum"), default="graph",
                    help="query vector for region matching: the graph's region_query, or the query's sum-pooled frame")
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        raise SystemExit(f"grocery dataset not found (set {datasets.ENV_VAR})")
    t_start = time.perf_counter()
    model = Model(args.model, args.threads)
    if args.ingestion_only:
        train = datasets.grocery_split(root, "train")
        print(json.dumps({"ingestion_ms_per_image": ingestion_cost(model, train[:: len(train) // 32][:32]),
                          "threads": args.threads}))
        return 0
    wanted = args.protocols.split(",")
    protos = get_protocols(root, ("P3", "P1"))
    scene_list = build_scenes(root, ROOT / ".data" / "scenes")
    scene_boxes = {s.photo.path: s.box for s in scene_list}
    products = protos["P3"].queries
    protos = {"S": Protocol("S", products, [s.photo for s in scene_list],
                            "val product photos -> the 81 iconic images pasted at 25-40% into shop photos", []),
              **protos}
    protos = {k: v for k, v in protos.items() if k in wanted or k == "P1"}  # P1's database measures storage
    if args.smoke:
        protos = {k: v.limited(4, 8) for k, v in protos.items()}
    results, examples = {}, None
    for name, proto in protos.items():
        if name not in wanted:
            continue
        log(f"{name}: {len(proto.queries)} queries, {len(proto.database)} database images")
        results[name], extra = evaluate(model, proto, args.n, args.query_side)
        if name == "S":
            examples = extra
            results["S-boxes"] = {m: box_quality(proto, extra, scene_boxes, m) for m in ("regions", "qam")}
            log(f"  S boxes: {results['S-boxes']}")
    if args.cd_model:
        cd_model = Model(args.cd_model, args.threads)
        cd = get_protocols(root, ("CD",))["CD"]
        if args.smoke:
            cd = cd.limited(4, 8)
        log(f"CD: {len(cd.queries)} queries, {len(cd.database)} database images ({args.cd_model})")
        results["CD"], _ = evaluate(cd_model, cd, args.n, args.query_side)
    r = model.meta["regions"]
    sample = [p for p in protos["P1"].database][:: max(1, len(protos["P1"].database) // 32)][:32]
    model.run([p.path for p in sample])
    n_regions = float(np.mean([len(model.cache[p.path][2]) for p in sample]))
    report = {
        "command": "python -m bench.rerank_eval " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model.meta["id"], "cd_model": args.cd_model and str(args.cd_model), "n": args.n,
        "params": {"qe": {"k": QE_K, "alpha": QE_ALPHA}, "dba": {"k": DBA_K, "alpha": DBA_ALPHA},
                   "ospp_levels": 3, "fmp": 8, "region_dim": r["dim"]},
        "results": results,
        "storage": {"regions_per_item": round(n_regions, 1),
                    "bytes_per_item_float32": int(round(n_regions * (r["dim"] * 4 + 16))),
                    "global_bytes_per_item": model.meta["dim"] * 4},
        "ingestion_ms_per_image": ingestion_cost(model, sample),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`{report['command']}`", "",
             "| protocol | method | mAP | mAP@20 | R@1 | R@5 | R@10 | ms/query |", "|---|---|---|---|---|---|---|---|"]
    for pname, rows in results.items():
        if pname == "S-boxes":
            continue
        for m, v in rows.items():
            lines.append(f"| {pname} | {m} | {v['mAP']:.3f} | {v['mAP@20']:.3f} | {v['recall@1']:.2f} | "
                         f"{v['recall@5']:.2f} | {v['recall@10']:.2f} | {v['ms_per_query']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    if examples is not None:
        draw_examples(protos["S"], examples, scene_boxes, args.out / "examples-S.jpg")
    print(json.dumps({k: report[k] for k in ("storage", "ingestion_ms_per_image", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
