"""The mesh's exact search path, scored offline: what `visearch ingest` stores and what `visearch
search` answers, computed in this process with the services' own classes and decisions.

    python -m bench.meshpath --protocol P1 [--ingest-objects detected+full] [--query-objects both]
                             [--rerank qe] [--out DIR]

Catalog side as the worker does it: each database photo detected (the detection service's
DetectionModel, up to 3 objects), its objects (the full frame and the detected boxes, per the
ingest policy) embedded by the embedding service's Embedder in batches of 16 photos. Query side as
the gateway does it: detection (up to 5 objects), the views of the query policy
(visearch.search.query_views), one embedding call. Search: exact inner products over every stored
object (the mesh's HNSW at ef >= 128 finds the same rows at these sizes), the rows per view, best
object per item, the candidates and the lead view by visearch.search; re-ranking by the re-rank
service's functions (alpha-QE, or visearch.local for "verify"). tests/test_mesh.py checks that the
mesh over gRPC scores within 0.01 of this on the same model.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visearch import datasets, local, regions, search
from visearch.demo import item_id
from visearch.detection_model import DetectionModel
from visearch.embedding_model import Embedder
from visearch.imaging import image_size
from visearch.inference import OnnxRuntimeBackend
from visearch.metrics import retrieval_report
from visearch.searching import MAX_QUERY_OBJECTS
from visearch.settings import DetectionSettings, GatewaySettings, RerankSettings, WorkerSettings

QUERY_OBJECTS = MAX_QUERY_OBJECTS  # the gateway's, from the search pipeline it runs


@dataclass
class Obj:
    item_id: str
    object_id: str
    score: float
    box: tuple


@dataclass
class Hit:
    item_id: str
    score: float
    verified: bool = False
    match: bool = False
    similarity: float = 0.0  # the global score it was a candidate with (before re-ranking)
    inliers: int = 0  # its verification against the query ("verify"; 0 when not checked)
    matches: int = 0  # the tentative correspondences that verification started from
    coverage: float = 0.0  # local.coverage of its inliers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _defaults(cls, field: str):
    return cls.model_fields[field].default


class MeshPath:
    def __init__(self, repo: Path, ingest_objects: str, max_objects: int, query_objects: str, rerank: str,
                 rerank_candidates: int = 100):
        self.backend = OnnxRuntimeBackend(Path(repo), {}, 1)
        self.detector = DetectionModel(self.backend, DetectionSettings(detection_port=0, model_repository=Path(repo)))
        self.embedder = Embedder(self.backend, 32)
        self.ingest_objects, self.max_objects = ingest_objects, max_objects
        self.query_objects, self.rerank, self.n_candidates = query_objects, rerank, rerank_candidates
        self.params = local.VerifyParams()
        self.objects: list[Obj] = []
        self.vectors = np.zeros((0, 0), np.float32)
        self.local: dict[int, local.Features] = {}
        rs = RerankSettings.model_fields
        self.qe_k, self.qe_alpha = rs["qe_k"].default, rs["qe_alpha"].default

    async def ingest(self, photos: list[datasets.Photo], batch: int = 16) -> None:
        want_local = self.rerank == "verify"
        vecs = []
        for start in range(0, len(photos), batch):
            part = photos[start:start + batch]
            datas = [p.path.read_bytes() for p in part]
            full = [(0.0, 0.0, float(w), float(h)) for w, h in map(image_size, datas)]
            if self.ingest_objects == "full":
                per_image = [[f] for f in full]
            else:
                _, found = await self.detector.detect(datas, max_detections=self.max_objects)
                per_image = []
                for n, boxes in enumerate(found):
                    b = [x.xyxy for x in boxes][:self.max_objects]
                    per_image.append([full[n], *b] if self.ingest_objects == "detected+full" or not b else b)
            items = [(datas[n], box) for n, boxes in enumerate(per_image) for box in boxes]
            v, _, feats = await self.embedder.embed_with_regions(items, False, "",
                                                                 local.capacity("rootsift", 32) if want_local else 0)
            k = 0
            for n, boxes in enumerate(per_image):
                for j, box in enumerate(boxes):
                    if want_local:
                        self.local[len(self.objects)] = local.Features.from_bytes(feats[k])
                    self.objects.append(Obj(item_id(part[n]), f"{item_id(part[n])}#{j}", 0.0, box))
                    k += 1
            vecs.append(v)
            if (start // batch) % 20 == 0:
                log(f"  ingested {start + len(part)}/{len(photos)} photos, {len(self.objects)} objects")
        self.vectors = np.concatenate(vecs)
        self.index = {o.object_id: i for i, o in enumerate(self.objects)}

    def _rows(self, q: np.ndarray, rows: int) -> list[Obj]:
        s = self.vectors @ q
        top = np.argsort(-s, kind="stable")[:rows]
        return [Obj(self.objects[i].item_id, self.objects[i].object_id, float(s[i]), self.objects[i].box) for i in top]

    async def prepare(self, photo: Path) -> dict:
        """The query side as the gateway computes it: detection, the views, their embeddings (and
        the local features of the full frame, or of the lead view, for "verify")."""
        data = photo.read_bytes()
        w, h = image_size(data)
        full = (0.0, 0.0, float(w), float(h))
        detections = []
        if self.query_objects != "full":
            _, found = await self.detector.detect([data], max_detections=QUERY_OBJECTS)
            detections = [b.xyxy for b in found[0]]
        views = search.query_views(self.query_objects, detections, full)
        items = [(data, None if v == full else v) for v in views]
        want_local = self.rerank == "verify"
        vecs, _, feats = await self.embedder.embed_with_regions(items, False, "",
                                                                local.QUERY_FEATURES if want_local else 0,
                                                                local.QUERY_SIDE)
        j = next((i for i, v in enumerate(views) if v == full), 0)
        return {"views": views, "full": full, "vecs": vecs,
                "local": local.Features.from_bytes(feats[j]) if want_local else None,
                "area": (views[j][2] - views[j][0]) * (views[j][3] - views[j][1])}

    def rank(self, q: dict, top_k: int = 100, query_margin: float = 0.0, crop_margin: float = 0.0,
             rerank: str | None = None) -> list[str]:
        """The answer the gateway and the re-rank service give for a prepared query."""
        return [h.item_id for h in self.hits(q, top_k, query_margin, crop_margin, rerank)]

    def subset(self, items: set[str]) -> MeshPath:
        """The same path over a catalog of only `items` (their stored objects, as ingested)."""
        keep = [i for i, o in enumerate(self.objects) if o.item_id in items]
        other = copy.copy(self)
        other.objects = [self.objects[i] for i in keep]
        other.vectors = self.vectors[keep]
        other.local = {n: self.local[i] for n, i in enumerate(keep) if i in self.local}
        other.index = {o.object_id: n for n, o in enumerate(other.objects)}
        return other

    def hits(self, q: dict, top_k: int = 100, query_margin: float = 0.0, crop_margin: float = 0.0,
             rerank: str | None = None) -> list[Hit]:
        """`rank` with each hit's score as the re-rank service returns it, and for "verify" whether
        it was verified and whether it is a match (the search's `SearchHit.match`)."""
        rerank = rerank or self.rerank
        margins = search.view_margins(q["views"], q["full"], query_margin)
        rows = search.first_rows(top_k, self.n_candidates)
        while True:
            results = [self._rows(v, rows) for v in q["vecs"]]
            best = search.best_per_item(results, margins, crop_margin)
            if search.enough_rows(best, results, rows, top_k):
                break
            rows = search.more_rows(rows)
        chosen = search.candidates(best, top_k, self.n_candidates)
        qv = q["vecs"][search.lead_view(results)]
        index = self.index
        db = np.stack([self.vectors[index[c.object_id]] for _, c in chosen])
        if rerank == "qe":
            expanded = regions.alpha_qe(qv, db, db @ qv, self.qe_k, self.qe_alpha)
            scores = db @ expanded
            order = np.argsort(-scores, kind="stable")
            return [Hit(chosen[i][1].item_id, float(scores[i]), similarity=chosen[i][0]) for i in order][:top_k]
        if rerank == "verify":
            # local.verify_top and fuse, with each (query, object) verification computed once across calls.
            memo = q.setdefault("checks", {})
            checks = {}
            for i, (_, c) in enumerate(chosen[:min(self.params.top, len(chosen))]):
                k = index[c.object_id]
                if k in self.local and q["local"] is not None and len(q["local"]) >= 2 and len(self.local[k]) >= 2:
                    if c.object_id not in memo:
                        memo[c.object_id] = local.verify(q["local"], self.local[k])
                    checks[i] = memo[c.object_id]
            boxes = {i: c.box for i, (_, c) in enumerate(chosen[:self.params.top])}
            r = local.fuse(qv, db, np.array([s for s, _ in chosen], np.float32), checks, boxes, q["area"], self.params)
            return [Hit(chosen[i][1].item_id, float(f), i in r.verified, i in r.matched, chosen[i][0],
                        checks[i].inliers if i in checks else 0, checks[i].matches if i in checks else 0,
                        local.coverage(checks[i], boxes[i], q["area"]) if i in checks else 0.0)
                    for i, f in zip(r.order, r.scores, strict=True)][:top_k]
        return [Hit(c.item_id, s, similarity=s) for s, c in chosen][:top_k]

    async def search(self, photo: Path, top_k: int = 100) -> list[str]:
        return self.rank(await self.prepare(photo), top_k)

    async def close(self) -> None:
        await self.backend.close()


async def evaluate(protocol: str, repo: Path, ingest_objects: str, max_objects: int, query_objects: str, rerank: str,
                   queries: list | None = None, database: list | None = None,
                   query_margin: float = _defaults(GatewaySettings, "query_crop_margin"),
                   catalog_margin: float = _defaults(GatewaySettings, "catalog_crop_margin")) -> dict:
    root = datasets.grocery_root()
    if queries is None:
        train, val = datasets.grocery_split(root, "train"), datasets.grocery_split(root, "val")
        queries = [p for p in val if p.is_product]
        database = train if protocol == "P1" else datasets.grocery_iconic(root)
    mp = MeshPath(repo, ingest_objects, max_objects, query_objects, rerank)
    try:
        await mp.ingest(database)
        rankings = [mp.rank(await mp.prepare(q.path), 100, query_margin, catalog_margin) for q in queries]
    finally:
        await mp.close()
    by_class: dict[int, set[str]] = {}
    for p in database:
        by_class.setdefault(p.fine_id, set()).add(item_id(p))
    return retrieval_report(rankings, [by_class.get(q.fine_id, set()) for q in queries])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default="P1", choices=("P1", "P3"))
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--ingest-objects", default=_defaults(WorkerSettings, "ingest_objects"))
    ap.add_argument("--max-objects", type=int, default=_defaults(WorkerSettings, "ingest_max_objects"))
    ap.add_argument("--query-objects", default=_defaults(GatewaySettings, "query_objects"))
    ap.add_argument("--rerank", default=_defaults(GatewaySettings, "rerank_default"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = asyncio.run(evaluate(args.protocol, args.model, args.ingest_objects, args.max_objects,
                                  args.query_objects, args.rerank))
    report.update(protocol=args.protocol, ingest_objects=args.ingest_objects, query_objects=args.query_objects,
                  rerank=args.rerank)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "meshpath.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
