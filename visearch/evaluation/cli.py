"""`visearch eval`: run the retrieval protocols for ONNX models and/or named descriptor methods.

    visearch eval --model model_repository --out runs/eval-default            # the served embedder
    visearch eval --method rmac --method spoc+w --arch efficientnet_lite0 --size 320 --out runs/eval
    visearch eval --method all --arch mobilenet_v2 --export runs/onnx --out runs/eval-mnv2
    visearch eval --method spoc+w --arch mobilenet_v2 --size 224 --smoke --out /tmp/smoke

Writes results.md (table), results.json (metrics, per-query AP, selection trials),
pr_curves.png and examples-<protocol>.png into --out; progress goes to stderr.
Learned parts of methods are fitted on train only; their hyper-parameters are
chosen on --select-on (a hold-out of TRAIN, default TH-CD), never on the
reported protocols. An ONNX model is scored as it is: whether it may be reported
on CD (trained without products 44..58) is its maker's to say.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from visearch import datasets

from . import harness
from .protocols import PROTOCOL_NAMES, get_protocols

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".data" / "eval-cache"
SMOKE_LIMIT = 3


def _parser() -> argparse.ArgumentParser:
    from visearch.modeling.backbones import SPECS

    ap = argparse.ArgumentParser(prog="visearch eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", type=Path, default=None,
                    help=f"Grocery Store dataset folder (default: ${datasets.ENV_VAR} or ../shared/data/grocery-store)")
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="ONNX model: a model.onnx, a version dir, or a model repository (repeatable)")
    ap.add_argument("--method", action="append", default=[],
                    help="named method (repeatable; 'all' for every one; see --list)")
    ap.add_argument("--arch", action="append", default=[], choices=sorted(SPECS),
                    help="backbone(s) for --method (repeatable; default efficientnet_lite0)")
    ap.add_argument("--size", type=int, default=320, help="input size for --method (multiple of 32)")
    ap.add_argument("--protocols", default="P1,P3,CD", help=f"comma-separated, from {','.join(PROTOCOL_NAMES)}")
    ap.add_argument("--select-on", default="TH-CD", help="train hold-out protocol to select hyper-parameters on, or 'none'")
    ap.add_argument("--out", type=Path, required=False, help="folder for results.md/.json and the PNGs")
    ap.add_argument("--cache", type=Path, default=None, help=f"feature/embedding cache (default {DEFAULT_CACHE}; "
                                                            "none with --smoke)")
    ap.add_argument("--no-cache", action="store_true", help="compute everything in memory")
    ap.add_argument("--limit", type=int, default=0, help="at most N queries per protocol, small databases (smoke runs)")
    ap.add_argument("--smoke", action="store_true", help=f"end to end in seconds: --limit {SMOKE_LIMIT}, no cache")
    ap.add_argument("--export", type=Path, default=None,
                    help="also export each method to ONNX here, check torch parity and time it (ms/img)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (ONNX Runtime uses --ort-threads)")
    ap.add_argument("--ort-threads", type=int, default=1)
    ap.add_argument("--examples-for", type=int, default=0, help="row index whose retrieval examples are drawn")
    ap.add_argument("--list", action="store_true", help="list the named methods and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    log = harness.stderr_progress
    from visearch.modeling.methods import METHODS

    all_methods = [*METHODS, "sift-vlad"]
    if args.list:
        for name, spec in METHODS.items():
            print(f"{name:10} {spec.summary}")
        print(f"{'sift-vlad':10} classic: dense SIFT + k-means + VLAD + PCA-whitening (no ONNX)")
        return 0
    methods = all_methods if "all" in args.method else args.method
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        log(f"unknown method(s) {unknown}; choose from {', '.join(all_methods)} (or all)")
        return 2
    if not methods and not args.model:
        log("nothing to evaluate: give --model PATH and/or --method NAME")
        return 2
    if args.out is None:
        log("--out DIR is required")
        return 2
    root = args.data or datasets.grocery_root()
    if root is None or not (Path(root) / "dataset" / "classes.csv").is_file():
        log(f"grocery dataset not found: pass --data or set {datasets.ENV_VAR}")
        return 2
    limit = args.limit or (SMOKE_LIMIT if args.smoke else 0)
    cache = None if (args.no_cache or (args.smoke and args.cache is None)) else (args.cache or DEFAULT_CACHE)
    names = [n.strip() for n in args.protocols.split(",") if n.strip()]
    try:
        protocols = get_protocols(Path(root), names)
        select_on = None if args.select_on.lower() == "none" else get_protocols(Path(root), [args.select_on])[args.select_on]
    except ValueError as exc:
        log(str(exc))
        return 2
    if limit:
        protocols = {n: p.limited(limit) for n, p in protocols.items()}
        select_on = select_on.limited(limit) if select_on is not None else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log(f"visearch eval: {', '.join(f'{n} ({len(p.queries)} q / {len(p.database)} db)' for n, p in protocols.items())}"
        f"; cache {cache or 'off'}")

    from . import report, runner

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for target in args.model:
        log(f"[onnx] {target}")
        try:
            rows.append(runner.run_onnx(target, protocols, cache, args.ort_threads, progress=log))
        except FileNotFoundError as exc:
            log(str(exc))
            return 2
    torch_methods = [m for m in methods if m in METHODS]
    if torch_methods:
        from visearch.offline import load_batch

        from .features import FeatureStore

        needed = harness.distinct_paths({**protocols, **({"sel": select_on} if select_on else {})})
        needed += [p.path for pr in protocols.values() for p in pr.fit]
        all_paths = list(dict.fromkeys(needed))
        if cache is not None and not limit:
            from .protocols import dataset_images

            all_paths = list(dict.fromkeys([*dataset_images(Path(root)), *all_paths]))
        for arch in args.arch or ["efficientnet_lite0"]:
            store = FeatureStore(arch, args.size, cache, progress=log)
            log(f"[maps] {arch}@{args.size}: {len(all_paths)} images, taps {store.shapes}")
            store.prepare(all_paths)
            batch = None
            if args.export is not None:
                qs = [p.path for p in next(iter(protocols.values())).queries]
                batch = load_batch((qs * 32)[:32 if not limit else 4], args.size)
            for m in torch_methods:
                log(f"[method] {m} on {arch}@{args.size}")
                row = runner.run_method(m, store, protocols, select_on, log, args.export, batch)
                rows.append(row)
                log(f"    {_summary(row)} ({row.seconds:.0f}s)")
                report.write_json(rows, protocols, args.out / "results.partial.json")  # survives an interrupted run
    if "sift-vlad" in methods:
        log("[classic] dense SIFT + VLAD")
        row = runner.run_sift(protocols, select_on, cache, log)
        rows.append(row)
        log(f"    {_summary(row)} ({row.seconds:.0f}s)")

    (args.out / "results.partial.json").unlink(missing_ok=True)
    command = "visearch eval " + " ".join(shlex.quote(a) for a in argv)
    written = report.write_report(rows, protocols, args.out, command, args.examples_for,
                                  {"dataset": str(root), "select_on": select_on.name if select_on else None,
                                   "limit": limit, "seconds": round(time.perf_counter() - t0, 1)})
    print(report.markdown_table(rows, list(protocols)), end="")
    log(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t0:.0f}s")
    return 0


def _summary(row) -> str:
    return "  ".join(f"{n}: mAP {r['mAP']:.3f} R@1 {r['recall@1']:.2f}" for n, r in row.results.items())


if __name__ == "__main__":
    sys.exit(main())
