"""What the served PCA is fitted on: grocery train photos alone, or with photos of other things.

    python -m bench.pca_fit [--model model_repository] [--dim 128] [--out runs/pca-fit]

The served embedder's version 2 is its version 1 with PCA to 128 dimensions in the graph
(visearch.modeling.reduce). Fitted on the grocery train photos alone, the kept directions are the
ones grocery photos vary along, and the generic protocol G (buildings, paintings, toys: never
trained on) loses more than the grocery protocols do. This bench fits the projection on each of
these sets and scores every protocol with the same descriptors (ONNX Runtime, as served; cached):

- `grocery`: the 2,640 grocery train photos (the fit before this bench);
- `grocery+stamps`: those and Tux Paint's stamps (Debian `tuxpaint-stamps-default`: 802 pictures of
  animals, food, vehicles, buildings, household things; flattened onto grey), none of them in any
  protocol.

TH (grocery train hold-out) and GS (OpenCV's sample photos) are the selection protocols; P1, P3
and G are reported beside them. Run it on the off-the-shelf model too (`--model runs/ots-repo`):
what the fine-tuning costs on generic photos is the fine-tuned model against the off-the-shelf
one at the same served dimension. Writes result.json and result.md into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from visearch.datasets import STAMPS_DIR, STAMPS_HINT, stamp_photos
from visearch.modeling.reduce import default_fit_paths, embed_paths, fit_pca, project

SELECT = ("TH", "GS")
REPORT = ("P1", "P3", "G")


def run(model: Path, dim: int, out: Path, limit: int = 0, stamps_dir: Path = STAMPS_DIR, progress=print) -> dict:
    from bench.common import write_result
    from visearch.datasets import grocery_root
    from visearch.evaluation import harness, runner
    from visearch.evaluation.protocols import get_protocols
    from visearch.imaging import preprocessing_tag

    src, meta = runner.onnx_model_path(model)
    if "reduction" in meta:  # start from the full-dimension source of a served reduction
        src, meta = runner.onnx_model_path(src.parent.parent / str(meta["reduction"]["source_version"]))
    root = grocery_root()
    protocols = get_protocols(root, [*SELECT, *REPORT])
    if limit:
        protocols = {n: p.limited(limit) for n, p in protocols.items()}
    train = default_fit_paths()
    stamps = stamp_photos(out / "stamps", stamps_dir)
    if limit:
        train, stamps = train[::max(1, len(train) // (4 * limit))], stamps[::max(1, len(stamps) // (2 * limit))]
    fit_sets = {"grocery": train, "grocery+stamps": train + stamps}
    paths = list(dict.fromkeys([*harness.distinct_paths(protocols), *train, *stamps]))
    sha = (meta.get("model_sha256") or "")[:12]
    emb = harness.embed_all(lambda ps: embed_paths(src, meta, ps, progress), paths,
                            out / f"emb-{sha or 'model'}-{preprocessing_tag()}.npz", progress)
    rows = [{"fit": "none", "dim": int(meta["dim"]), "fit_photos": 0}]
    bases = {}
    for name, fit_paths in fit_sets.items():
        bases[name] = fit_pca(np.stack([emb[p] for p in fit_paths]), dim)
        rows.append({"fit": name, "dim": dim, "fit_photos": len(fit_paths)})
    for pname, proto in protocols.items():
        q, db = harness.protocol_matrices(proto, emb)
        for row in rows:
            qq, dd = (q, db) if row["fit"] == "none" else (project(q, *bases[row["fit"]]), project(db, *bases[row["fit"]]))
            m = harness.evaluate_embeddings(proto, qq, dd)
            row[pname] = {"mAP": round(m["mAP"], 4), "mAP@20": round(m["mAP@20"], 4), "recall@1": round(m["recall@1"], 4)}
        progress(f"{pname}: " + ", ".join(f"{r['fit']} {r[pname]['mAP']}" for r in rows))
    result = {"model": str(src), "model_id": meta.get("id"), "select_on": list(SELECT), "report": list(REPORT),
              "variants": rows, "stamps": len(stamps), "stamps_from": STAMPS_HINT}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    protos = [*r["select_on"], *r["report"]]
    lines = ["| fit | dim | fit photos | " + " | ".join(f"{p} mAP | {p} R@1" for p in protos) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(protos))]
    for v in r["variants"]:
        lines.append(f"| {v['fit']} | {v['dim']} | {v['fit_photos']} | "
                     + " | ".join(f"{v[p]['mAP']} | {v[p]['recall@1']}" for p in protos) + " |")
    lines += ["", f"{r['model_id']}; selection protocols {', '.join(r['select_on'])}, reported {', '.join(r['report'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="Queries per protocol (0: all): for a smoke run.")
    ap.add_argument("--stamps", type=Path, default=STAMPS_DIR, help="folder of the Tux Paint stamps (PNG)")
    ap.add_argument("--out", type=Path, default=Path("runs/pca-fit"))
    args = ap.parse_args(argv)
    try:
        print(markdown(run(args.model, args.dim, args.out, args.limit, args.stamps)))
    except FileNotFoundError as exc:
        print(f"bench.pca_fit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
