"""`visearch train`: train a descriptor model from a config (docs/TRAINING.md).

    visearch train --config configs/default.json [--out runs/default] [--seed N] [--smoke] [--budget SECONDS]

Progress (epoch, loss, hold-out metric, ETA) goes to stderr; the final summary (paths,
hold-out metrics, seconds) is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .data import HOLDOUT_OF_SPLIT
from .train import load_config, stderr, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="visearch train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="training config (JSON or YAML), e.g. configs/default.json")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    ap.add_argument("--seed", type=int, default=None, help="override the config's seed")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a handful of photos (tests, quick checks)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's, else 2)")
    ap.add_argument("--cache", type=Path, default=None, help="frozen-feature cache folder (default: .data/train-cache)")
    ap.add_argument("--split", choices=tuple(HOLDOUT_OF_SPLIT), default=None,
                    help="override the config's training split: all (P1/P3 models), cd (class-disjoint models) "
                         "trainval (the production model: all plus the val photos), far (P1/P3 models selected on TF, "
                         "a hold-out closer to val's shift), iconic or trainval-iconic (all or trainval plus each "
                         "product's iconic image)")
    ap.add_argument("--name", default=None, help="override the config's run name")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds the whole run may take: the fine-tuning epochs are cut to what the measured pace "
                         "fits, and the learning-rate schedule ends there (a GPU machine lent for minutes)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:
        print(f"train: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.split:
        cfg = dataclasses.replace(cfg, split=args.split)
    if args.name:
        cfg = dataclasses.replace(cfg, name=args.name)
    out = args.out or Path("runs") / cfg.name
    try:
        if cfg.mining:
            from .mining import mine_and_retrain

            summary = mine_and_retrain(cfg, out, smoke=args.smoke, cache_root=args.cache)
        else:
            run = train(cfg, out, smoke=args.smoke, cache_root=args.cache, budget=args.budget)
            summary = {"name": cfg.name, "best": str(run.best), "epoch": run.meta["epoch"],
                       "epochs_run": run.epochs_run, "interrupted_in_epoch": run.interrupted_in_epoch,
                       "holdout": run.meta["holdout_metrics"], "seconds": round(run.seconds, 1), "id": run.meta["id"]}
    except FileNotFoundError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    stderr(f"done: {summary.get('best')}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
