"""Time exported ONNX models one after another: ONNX Runtime CPU, 1 intra-op thread, batch of 32 real photos.

    python -m bench.time_onnx runs/onnx-lite0:320 runs/onnx-mnv2:224 --out runs/onnx-times.json

Each DIR:SIZE is a folder of `.onnx` files (as `visearch eval --export DIR` writes, or a model
version folder such as runs/twin-repo/embedder/1) and their input size; prints and writes
{file name: ms per image} (best of 3 runs after a warm-up; every file by its path when two
folders hold the same file name).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visearch import datasets
from visearch.modeling.methods import onnx_ms_per_image
from visearch.offline import load_batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR:SIZE")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    root = datasets.grocery_root()
    if root is None:
        print(f"grocery dataset not found: set {datasets.ENV_VAR}", file=sys.stderr)
        return 2
    photos = [p.path for p in datasets.grocery_split(root, "val") if p.is_product][:32]
    specs = [(Path(d), int(size)) for d, size in (spec.rsplit(":", 1) for spec in args.dirs)]
    files = [(f, size) for d, size in specs for f in sorted(d.glob("*.onnx"))]
    by_path = len({f.name for f, _ in files}) < len(files)  # the same file name in two folders
    times: dict[str, float] = {}
    batches = {size: load_batch(photos, size) for _, size in specs}
    for f, size in files:
        batch = batches[size]
        name = str(f) if by_path else f.name
        times[name] = round(onnx_ms_per_image(f, batch, threads=args.threads, repeats=3), 1)
        print(f"{name}: {times[name]} ms/img", flush=True)
    if args.out:
        args.out.write_text(json.dumps(times, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
