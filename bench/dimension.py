"""Descriptor dimension: PCA (and PCA-whitening) of the served descriptor, in the graph, with its mAP.

    python -m bench.dimension [--model model_repository] [--dims 1280,512,256,128,64] [--export 128] [--out runs/dimension]

1. Embeds every photo of protocols P1, P3 and TH once with the served embedder (its
   full-dimension source when the served version is already a reduction; ONNX Runtime,
   exactly as served; cached in --out).
2. For each --dims d and whitening power w in --powers (0: PCA rotation and projection
   only; 0.5: square-root whitening; 1: full whitening), fits x -> diag(l^(-w/2)) V_d^T (x - mu),
   then L2, on each protocol's own `fit` photos (train photos only, never a query) and
   scores it. TH (a hold-out inside train, which the embedder was not trained on) is where
   a variant is chosen; P1 and P3 are reported beside it.
3. --export d: appends the chosen projection to the ONNX graph (MatMul + Add + L2
   normalisation after the "embeddings" output, fitted on all train photos; the region
   outputs are untouched), checks the graph's descriptors against the numpy projection,
   times it beside the served model (one thread, batch 1) and scores it with the evaluation
   harness through ONNX Runtime (as `visearch eval --model` does). The version folder
   (model.onnx + meta.json) is written to --out/pca-<d>/.

The smaller descriptor's effect on the vector store (memory, search time) is measured by
`python -m bench.vectors --dim D`. Writes result.json and result.md into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from visearch.modeling.reduce import embed_paths, fit_pca
from visearch.models.graph import append_projection, project
from visearch.models.record import ModelRecord
from visearch.offline import load_batch
from visearch.ortsession import ort_session

ROOT = Path(__file__).resolve().parents[1]


def score_variants(protocols: dict, emb: dict, dims: list[int], powers: list[float]) -> list[dict]:
    """mAP / recall@1 of every (dim, power), each protocol's projection fitted on its own `fit` photos."""
    from visearch.evaluation import harness

    rows = [{"dim": int(next(iter(emb.values())).shape[0]), "power": None, "label": "served"}]
    rows += [{"dim": d, "power": p, "label": f"pca {d}" + (f" w{p:g}" if p else "")} for d in dims for p in powers]
    for name, proto in protocols.items():
        q, db = harness.protocol_matrices(proto, emb)
        fit = np.stack([emb[p.path] for p in proto.fit])
        for row in rows:
            if row["power"] is None:
                qq, dd = q, db
            else:
                w, b = fit_pca(fit, row["dim"], row["power"])
                qq, dd = project(q, w, b), project(db, w, b)
            m = harness.evaluate_embeddings(proto, qq, dd)
            row[name] = {"mAP": round(m["mAP"], 4), "recall@1": round(m["recall@1"], 4)}
    return rows


def time_b1(paths: dict[str, Path], x: np.ndarray, reps: int = 60) -> dict[str, float]:
    """Median ms of a batch-1 forward (all outputs) of each model, one intra-op thread, the models
    interleaved forward by forward so that both see the same moments of the machine."""
    sessions = {k: ort_session(p, 1) for k, p in paths.items()}
    ms: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(reps + 2):
        xb = x[i % len(x):i % len(x) + 1]
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: xb})
            if i >= 2:  # two warm-up rounds
                ms[k].append((time.perf_counter() - t) * 1000)
    return {k: round(float(np.median(v)), 2) for k, v in ms.items()}


def run(model: Path, dims: list[int], powers: list[float], export: int, export_power: float, out: Path,
        limit: int = 0, progress=print) -> dict:
    from bench.common import write_result
    from visearch.checksum import sha256_file
    from visearch.datasets import grocery_root, grocery_split
    from visearch.evaluation import harness, runner
    from visearch.evaluation.protocols import get_protocols
    from visearch.imaging import preprocessing_tag

    src, meta = runner.onnx_model_path(model)
    if "reduction" in meta:  # the served version is already reduced: start from its full-dimension source
        src, meta = runner.onnx_model_path(src.parent.parent / str(meta["reduction"]["source_version"]))
    size = int(meta["input_size"])
    root = grocery_root()
    protocols = get_protocols(root, ["P1", "P3", "TH"])
    if limit:
        protocols = {n: p.limited(limit) for n, p in protocols.items()}
    outp = meta.get("output_name") or "embeddings"
    paths = list(dict.fromkeys([*harness.distinct_paths(protocols), *(f.path for p in protocols.values() for f in p.fit)]))
    sha = (meta.get("model_sha256") or "")[:12]
    emb = harness.embed_all(lambda ps: embed_paths(src, meta, ps, progress), paths,
                            out / f"emb-{sha or 'model'}-{preprocessing_tag()}.npz", progress)
    t = time.perf_counter()
    rows = score_variants(protocols, emb, dims, powers)
    progress(f"scored {len(rows)} variants on {', '.join(protocols)} in {time.perf_counter() - t:.0f} s")
    result = {"model": str(src), "model_id": meta.get("id"), "protocols": list(protocols), "variants": rows}

    if export:
        fit = np.stack([emb[p.path] for p in protocols["P1"].fit])  # all train photos (a smoke run: a few)
        w, b = fit_pca(fit, export, export_power)
        dst = out / f"pca-{export}"
        path = append_projection(src, dst / "model.onnx", w, b, outp)
        sha256 = sha256_file(path)
        label = f"pca{export}" + (f"w{export_power:g}" if export_power else "")
        ModelRecord.from_dict(dict(meta), str(src)).derive(
            id=f"{meta.get('id') or 'embedder'}-{label}", dim=export, model_sha256=sha256,
            pca={"dim": export, "whitening_power": export_power, "in": int(w.shape[0]),
                 "fitted_on": f"served descriptors of {len(fit)} grocery train photos",
                 "in_graph": "MatMul + Add + L2 after the embeddings output"}).write(dst)
        val = [p.path for p in grocery_split(root, "val") if p.is_product][:16]
        x = load_batch(val, size)
        got = embed_paths(path, meta, val, progress)
        parity = float(np.abs(got - project(embed_paths(src, meta, val, progress), w, b)).max())
        ms = time_b1({"served": src, label: path}, x)
        progress(f"exported {path} (parity {parity:.2e}); batch-1 ms {ms}")
        row = runner.run_onnx(dst, {n: p for n, p in protocols.items() if n != "TH"}, None, 1, progress=lambda m: None)
        result["export"] = {"path": str(path), "dim": export, "power": export_power, "parity_max_abs_diff": parity,
                            "batch1_ms": ms, "as_served": {n: {k: round(v, 4) for k, v in r.items()
                                                               if k in ("mAP", "recall@1")}
                                                           for n, r in row.results.items()}}
        progress(f"as served through ONNX Runtime: {result['export']['as_served']}")
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    protos = r["protocols"]
    lines = ["| variant | dim | bytes/vector | " + " | ".join(f"{p} mAP | {p} R@1" for p in protos) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(protos))]
    for v in r["variants"]:
        lines.append(f"| {v['label']} | {v['dim']} | {4 * v['dim']} | "
                     + " | ".join(f"{v[p]['mAP']} | {v[p]['recall@1']}" for p in protos) + " |")
    if "export" in r:
        e = r["export"]
        lines += ["", f"In the graph ({e['path']}): parity {e['parity_max_abs_diff']:.1e} against numpy; batch-1 ms "
                  + ", ".join(f"{k} {v}" for k, v in e["batch1_ms"].items()) + "; as served: "
                  + ", ".join(f"{n} mAP {m['mAP']} R@1 {m['recall@1']}" for n, m in e["as_served"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--dims", default="1280,512,256,128,64")
    ap.add_argument("--powers", default="0,0.5,1", help="Whitening powers to try (0: PCA projection only).")
    ap.add_argument("--export", type=int, default=128, help="Dimension to build into the graph (0: none).")
    ap.add_argument("--export-power", type=float, default=0.0)
    ap.add_argument("--limit", type=int, default=0, help="Queries per protocol (0: all): for a smoke run.")
    ap.add_argument("--out", type=Path, default=Path("runs/dimension"))
    args = ap.parse_args(argv)
    r = run(args.model, [int(d) for d in args.dims.split(",")], [float(p) for p in args.powers.split(",")],
            args.export, args.export_power, args.out, args.limit)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
