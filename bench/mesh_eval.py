"""Accuracy through the mesh, as a user gets it: catalogs ingested with `visearch ingest`, queries
searched with `visearch search`, one row per search configuration, all in one run.

    python -m bench.mesh_eval --out runs/mesh-eval [--configs default,full-frame,verify,...] [--keep DIR]
    python -m bench.mesh_eval --protocols CD --embedder-repo runs/ots-repo --adapt 4 --out runs/mesh-eval-cd

Protocols: P1 (val product photos -> the 2,640 train photos), P3 (-> the 81 iconic images) and S
(-> the iconic images pasted small into shop photos, visearch.scenes), each a catalog of its own
ingested with the mesh's defaults (the full frame and up to 3 detected objects per image). A
configuration is a set of `visearch search` flags ("default" is none). Prints and writes
mAP, mAP@20, R@1, R@5, the share of top-1 hits flagged `match` and their precision, and the
search latency p50/p99 (each query searched again on its own: `alone`).

CD (the val photos of the 15 products CD models never train on -> the train photos of every product
but the 16 they train on) is there for models trained on the class-disjoint split, or off the shelf:
`--embedder-repo` serves the embedder versions of another repository (the detector stays the
project's). `--adapt K` then adapts each catalog to itself (`visearch adapt --views K --wait`,
docs/ADAPT.md) and searches every configuration again ("<config>+adapted" rows). The mesh then runs
on a repository of links in --out, which receives the adapted versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from visearch import datasets
from visearch.demo import item_id, write_manifest
from visearch.metrics import match_report, retrieval_report

CONFIGS = {
    "default": [],
    "full-frame": ["--full-frame"],
    "none": ["--rerank", "none"],
    "none-full-frame": ["--rerank", "none", "--full-frame"],
    "qe": ["--rerank", "qe"],
    "verify": ["--rerank", "verify"],
    "verify-full-frame": ["--rerank", "verify", "--full-frame"],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "visearch.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"visearch {' '.join(args[:3])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def protocols(root: Path, out: Path, smoke: bool) -> dict[str, tuple[list, list]]:
    """name -> (queries, database photos); S's database are the scenes."""
    from visearch.scenes import build_scenes

    train, val = datasets.grocery_split(root, "train"), datasets.grocery_split(root, "val")
    iconic = datasets.grocery_iconic(root)
    queries = [p for p in val if p.is_product]
    scenes = [s.photo for s in build_scenes(root, out / "scenes")]
    protos = {"P1": (queries, train), "P3": (queries, iconic), "S": (queries, scenes)}
    from visearch.evaluation.protocols import get_protocols

    cd = get_protocols(root, ["CD"])["CD"]
    protos["CD"] = (cd.queries, cd.database)
    if smoke:
        def small(qs: list, db: list) -> tuple[list, list]:
            keep = {q.fine_id for q in qs[:3]}
            return qs[:3], [p for p in db if p.fine_id in keep] + [p for p in db if p.fine_id not in keep][:5]

        protos = {k: small(qs, db) for k, (qs, db) in protos.items()}
    return protos


def score(env: dict, catalog: str, queries: list, by_class: dict[int, set[str]], config: str) -> dict:
    """One configuration's row: every query searched through the CLI, scored against its positives."""
    out = [json.loads(line) for line in cli(env, "search", *[str(q.path) for q in queries], "--catalog", catalog,
                                             "--top-k", "100", "--json", *CONFIGS[config]).stdout.splitlines()
           if line.strip()]
    rankings = [[h["item_id"] for h in o.get("hits", [])] for o in out]
    positives = [by_class.get(q.fine_id, set()) for q in queries]
    rep = retrieval_report(rankings, positives)
    matches = match_report([o.get("hits", []) for o in out], positives)
    lat = sorted(alone(env, catalog, queries, config))
    return {"mAP": rep["mAP"], "mAP@20": rep["mAP@20"], "R@1": rep["recall@1"], "R@5": rep["recall@5"], **matches,
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "errors": sum("error" in o for o in out)}


def alone(env: dict, catalog: str, queries: list, config: str) -> list[float]:
    """Each query's latency searched on its own, as an app's search is (one Search call through the
    SDK the CLI runs; `visearch search` with several photos sends BatchSearch calls, whose latency
    is the whole batch's)."""
    from visearch import meshfiles
    from visearch.client import GatewayClient
    from visearch.sdk import search_one

    flags = CONFIGS[config]
    rerank = flags[flags.index("--rerank") + 1] if "--rerank" in flags else ""
    data = Path(env["VISEARCH_DATA_DIR"])
    # The admin key, as the bench's CLI calls use (main() drops VISEARCH_* from their environment).
    with GatewayClient(meshfiles.gateway_address(data), key=meshfiles.read_admin_key(data) or "", timeout=60) as client:
        outs = [search_one(client, str(q.path), catalog, 100, rerank, {}, "--full-frame" in flags) for q in queries]
    return [o["latency_ms"] for o in outs if "latency_ms" in o]


def linked_repo(dst: Path, embedder_repo: Path | None) -> Path:
    """A model repository of links: the embedder's versions from `embedder_repo` (default: the project's),
    the detector's from the project's; new versions (adaptations) are written here, not there."""
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    if dst.exists():
        shutil.rmtree(dst)
    for name, src in (("embedder", embedder_repo or DEFAULT_MODEL_REPOSITORY), ("detector", DEFAULT_MODEL_REPOSITORY)):
        (dst / name).mkdir(parents=True)
        shutil.copy(Path(src) / name / "config.pbtxt", dst / name / "config.pbtxt")
        for v in (Path(src) / name).iterdir():
            if v.name.isdigit():
                (dst / name / v.name).symlink_to(v.resolve())
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/mesh-eval"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--protocols", default="P1,P3,S")
    ap.add_argument("--keep", type=Path, help="a data dir for the mesh (left up afterwards, reused when up)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--embedder-repo", type=Path, help="serve this repository's embedder versions (default: the project's)")
    ap.add_argument("--adapt", type=int, default=0, metavar="K",
                    help="then adapt each catalog (K made-up views per object) and search again")
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        raise SystemExit("the Grocery Store dataset is not at ../shared/data/grocery-store")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.keep or Path(tempfile.mkdtemp(prefix="mesh-eval-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env["VISEARCH_DATA_DIR"] = str(data)
    if args.embedder_repo or args.adapt:
        env["VISEARCH_MODEL_REPOSITORY"] = str(linked_repo(args.out / "repo", args.embedder_repo))
    protos = {k: v for k, v in protocols(root, args.out, args.smoke).items() if k in args.protocols.split(",")}
    cli(env, "up")
    rows, result = [], {"configs": {}, "ingest": {}}
    try:
        for name, (queries, database) in protos.items():
            catalog = f"eval_{name.lower()}"
            manifest = write_manifest(database, args.out / f"{catalog}.csv")
            t0 = time.perf_counter()
            res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", catalog, "--wait",
                                 "--json").stdout)
            result["ingest"][name] = {**res, "seconds": round(time.perf_counter() - t0, 1)}
            log(f"{name}: ingested {res.get('ok')} of {len(database)} in {time.perf_counter() - t0:.0f} s")
            by_class: dict[int, set[str]] = {}
            for p in database:
                by_class.setdefault(p.fine_id, set()).add(item_id(p))
            for suffix in ("", "+adapted") if args.adapt else ("",):
                if suffix:
                    t0 = time.perf_counter()
                    job = json.loads(cli(env, "adapt", "--catalog", catalog, "--views", str(args.adapt), "--wait",
                                         "--json").stdout)["job"]
                    result.setdefault("adapt", {})[name] = {"seconds": round(time.perf_counter() - t0, 1), "job": job}
                    log(f"{name}: adapted and re-embedded in {time.perf_counter() - t0:.0f} s ({job['phase']})")
                for config in args.configs.split(","):
                    row = score(env, catalog, queries, by_class, config)
                    row = {"protocol": name, "config": config + suffix, **row}
                    rows.append(row)
                    log(f"{name} {row['config']:<18} mAP {row['mAP']:.3f} mAP@20 {row['mAP@20']:.3f} "
                        f"R@1 {row['R@1']:.2f} matched {row['matched_top1']:.2f} prec {row['match_precision']} "
                        f"p50 {row['p50_ms']} ms")
    finally:
        if not args.keep:
            cli(env, "down")
    result["rows"] = rows
    md = ["| protocol | search | mAP | mAP@20 | R@1 | R@5 | top-1 matched | match precision | p50 / p99 ms |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prec = f"{r['match_precision']:.3f}" if r["match_precision"] is not None else "-"
        md.append(f"| {r['protocol']} | {r['config']} | {r['mAP']:.3f} | {r['mAP@20']:.3f} | {r['R@1']:.2f} | "
                  f"{r['R@5']:.2f} | {r['matched_top1']:.2f} | {prec} | {r['p50_ms']} / {r['p99_ms']} |")
    write_result(args.out, result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
