"""Which views of a query and which objects of a catalog image decide an item: the crop margins of
the search path, chosen on train-only protocols and then scored once on the reported ones.

    python -m bench.policy_eval --out runs/policy [--smoke]

Runs the mesh's exact path offline (bench.meshpath: the services' own models and decisions) with
the default ingest policy (the full frame and up to 3 detected objects per catalog image) and the
default query policy ("both": the detector's best box and the full frame). A row counts less by
`query_crop_margin` when it comes from the query's crop and by `catalog_crop_margin` when it is a
detected object rather than a catalog image's full frame (visearch.search.best_per_item).

Selection (train photos only): TH-mesh (held-out train product photos -> the other train photos,
ingested as the mesh does), ST (held-out train product photos -> the 81 iconic images pasted small
into train shop photos: objects small in the catalog) and OT (held-out train product photos pasted
small into train shop photos -> the 81 iconic images: objects small in the query). The margins
maximise, with the "verify" re-rank, the smallest gain in mAP@20 over the previous default
(alpha-QE, no margins) across the three: a default must not lower any kind of catalog, so the
choice is the one whose worst protocol gains most (the mean, the first objective tried, picked a
catalog margin of 0.1 that lowers the object-in-scene rows). Reported: P1, P3, S (val
queries -> the pasted iconic scenes) and O (val queries pasted into val shop photos -> iconic),
with the chosen margins and with none, for "qe" and "verify".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import write_result
from bench.meshpath import MeshPath
from visearch import composites, datasets
from visearch.demo import item_id
from visearch.evaluation.protocols import get_protocols
from visearch.metrics import retrieval_report
from visearch.scenes import build_scenes

MARGINS = (0.0, 0.05, 0.1, 0.2)
SCALE = (0.20, 0.40)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pasted(queries: list[datasets.Photo], backgrounds: list[datasets.Photo], out: Path, seed: int
           ) -> list[datasets.Photo]:
    """Each query photo pasted small into a shop photo (an object in a scene), labelled as the query."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(queries):
        path = out / f"query-{i:04d}.jpg"
        if not path.is_file():
            bg = Image.open(backgrounds[int(rng.integers(len(backgrounds)))].path).convert("RGB")
            img, _ = composites.make_composite(rng, bg, [(Image.open(p.path).convert("RGB"), None)], size=300,
                                               scale=SCALE)
            img.save(path, quality=92)
        else:
            rng.integers(len(backgrounds))
        rows.append(replace(p, path=path))
    return rows


def protocols(root: Path, out: Path, smoke: bool) -> dict[str, tuple[list, list]]:
    train, val = datasets.grocery_split(root, "train"), datasets.grocery_split(root, "val")
    iconic = datasets.grocery_iconic(root)
    th = get_protocols(root, ("TH",))["TH"]
    scenes = [s.photo for s in build_scenes(root, out / "scenes")]
    products = [p for p in val if p.is_product]
    th_q = th.queries
    if smoke:
        th_q, products = th_q[::60][:4], products[:4]
    train_bg = [p for p in train if not p.is_product]
    val_bg = [p for p in val if not p.is_product]
    protos = {
        "TH-mesh": (th_q, th.database),
        "ST": (th_q, scenes),
        "OT": (pasted(th_q, train_bg, out / "OT", 11), iconic),
        "P1": (products, train),
        "P3": (products, iconic),
        "S": (products, scenes),
        "O": (pasted(products, val_bg, out / "O", 7), iconic),
    }
    if smoke:  # each catalog: its queries' products and a few others (every code path, a fraction of the images)
        protos = {k: (q, smoke_catalog(q, db)) for k, (q, db) in protos.items()}
    return protos


def smoke_catalog(queries: list, database: list, per_class: int = 3, others: int = 8) -> list:
    wanted = {q.fine_id for q in queries}
    seen: dict[int, int] = {}
    keep = []
    for p in database:
        if p.fine_id in wanted and seen.get(p.fine_id, 0) < per_class:
            seen[p.fine_id] = seen.get(p.fine_id, 0) + 1
            keep.append(p)
    rest = [p for p in database if p.fine_id not in wanted]
    return keep + rest[:: max(1, len(rest) // others)][:others]


def metrics(rankings: list[list[str]], queries: list, database: list) -> dict:
    by_class: dict[int, set[str]] = {}
    for p in database:
        by_class.setdefault(p.fine_id, set()).add(item_id(p))
    keep = [i for i, q in enumerate(queries) if by_class.get(q.fine_id)]
    return retrieval_report([rankings[i] for i in keep], [by_class[queries[i].fine_id] for i in keep])


async def run(args) -> dict:
    root = datasets.grocery_root()
    protos = protocols(root, args.out, args.smoke)
    grid = list(itertools.product(MARGINS, MARGINS))
    table: dict = {}
    if args.reselect:  # the grid of an earlier run, chosen again (no model runs)
        for k, v in json.loads((args.out / "result.json").read_text())["grid"].items():
            name, mq, mc, rr = k.split("|")
            table[(name, float(mq), float(mc), rr)] = v
    for name, (queries, database) in protos.items():
        if args.reselect:
            continue
        mp = MeshPath(args.model, "detected+full", 3, "both", "verify")
        try:
            log(f"{name}: ingesting {len(database)} catalog images, preparing {len(queries)} queries")
            await mp.ingest(database)
            prepared = [await mp.prepare(q.path) for q in queries]
        finally:
            await mp.close()
        for mq, mc in grid:
            for rr in ("qe", "verify"):
                if rr == "qe" and (mq, mc) not in ((0.0, 0.0),) and name in ("TH-mesh", "ST", "OT"):
                    continue
                rankings = [mp.rank(q, 100, mq, mc, rr) for q in prepared]
                table[(name, mq, mc, rr)] = metrics(rankings, queries, database)
        log(f"{name}: done ({len(table)} rows so far)")
    selection = ("TH-mesh", "ST", "OT")

    def worst_gain(g) -> float:
        return min(table[(n, *g, "verify")]["mAP@20"] - table[(n, 0.0, 0.0, "qe")]["mAP@20"] for n in selection)

    chosen = max(grid, key=worst_gain)
    log(f"chosen margins: query {chosen[0]}, catalog {chosen[1]}")
    # qe at the chosen margins on the reported protocols was computed in the grid.
    rows = []
    for name in protos:
        for (mq, mc), rr in itertools.product(sorted({(0.0, 0.0), chosen}), ("qe", "verify")):
            key = (name, mq, mc, rr)
            if key in table:
                rows.append({"protocol": name, "query_margin": mq, "catalog_margin": mc, "rerank": rr, **table[key]})
    return {"chosen": {"query_crop_margin": chosen[0], "catalog_crop_margin": chosen[1], "selected_on": selection,
                       "worst_gain": worst_gain(chosen)},
            "rows": rows, "grid": {"|".join(map(str, k)): v for k, v in table.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--out", type=Path, default=Path("runs/policy"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reselect", action="store_true", help="choose again from --out's result.json grid")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    md = ["| protocol | query margin | catalog margin | re-rank | mAP | mAP@20 | R@1 | R@5 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        md.append(f"| {r['protocol']} | {r['query_margin']} | {r['catalog_margin']} | {r['rerank']} | {r['mAP']:.3f} | "
                  f"{r['mAP@20']:.3f} | {r['recall@1']:.2f} | {r['recall@5']:.2f} |")
    write_result(args.out, result, "\n".join(md) + "\n")
    print(json.dumps(result["chosen"]))
    print("\n".join(md))


if __name__ == "__main__":
    main()
