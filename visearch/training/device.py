"""The GPU run, prepared: what travels to a lent device machine, and what comes back (docs/TRAINING.md).

A lent machine (the `device` tool) gets the working tree and at most 64 MiB in all per call, and
can reach nothing: no registry, no ../shared. The ImageNet weights (18.8 MB) and the 2,640 train
photos (58 MB, kept byte for byte) do not fit beside the tree in one call, so they travel in two
parts, each in a git-ignored folder named in that call's `carry`; the machine keeps the first
while it stays warm (30 s between calls). Files come back at most 16 MB each, 8 in all, so a
checkpoint (25 MB) comes back in parts with its sha256.

    python -m visearch.training.device pack                     # here: .device/a (weights + photos), .device/b
    bash scripts/device_train.sh check                          # there, call 1 (carry .device/a)
    bash scripts/device_train.sh train                          # there, call 2 (carry .device/b)
    python -m visearch.training.device unpack --from DIR --to runs   # here: the parts joined and checked

It runs there on the machine's own Python (torch, numpy, Pillow, OpenCV, onnx are in its image) with
the working tree and the carried weights' package on PYTHONPATH: nothing is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from visearch import datasets
from visearch.checksum import sha256_file as sha256
from visearch.modeling import backbones

MIB = 1 << 20
TREE_LIMIT = 64 * MIB  # what one call may carry: the working tree plus its carried paths
PART_BYTES = 15 * 10**6  # a file that comes back is at most 16 MB
MARGIN = 2 * MIB  # the tree grows between packing and the call
DATASET_FILES = ("classes.csv", "train.txt", "val.txt")
MANIFEST = "MANIFEST.json"


class DeviceError(RuntimeError):
    """A step that cannot go on; the message is the one line a person reads."""


def tree_bytes(repo: Path) -> int:
    """Bytes of what a call sends besides its carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def _train_lines(root: Path, per_class: int) -> list[str]:
    """train.txt's lines, at most `per_class` photos of each fine class (0: all), in file order."""
    seen: dict[str, int] = {}
    kept = []
    for line in (root / "dataset" / "train.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        fine = line.split(",")[1].strip()
        seen[fine] = seen.get(fine, 0) + 1
        if not per_class or seen[fine] <= per_class:
            kept.append(line)
    return kept


def pack(out: Path, root: Path, repo: Path, arch: str = "efficientnet_lite0", per_class: int = 0,
         limit: int = TREE_LIMIT) -> dict:
    """Write `out`/a (the weights' package and photos) and `out`/b (the other photos), split so that each call
    leaves the same room beside the tree: the tree may grow between packing and the calls by that much."""
    spec = backbones.SPECS[arch]
    weights = backbones.weights_path(arch)
    package_dir = weights.parents[len(Path(spec.weights_relpath).parts) - 1]
    lines = _train_lines(root, per_class)
    photos = [line.split(",")[0].strip() for line in lines]
    tree = tree_bytes(repo)
    room = limit - tree - MARGIN
    if out.exists():
        shutil.rmtree(out)
    parts = {"a": out / "a", "b": out / "b"}
    site = parts["a"] / "site" / package_dir.name
    shutil.copytree(package_dir, site, ignore=shutil.ignore_patterns("__pycache__", ".gitignore"))
    files: dict[str, dict[str, str]] = {"a": {}, "b": {}}
    used = {"a": 0, "b": 0}
    for f in sorted(q for q in site.rglob("*") if q.is_file()):  # the weights are checked like the photos
        files["a"][str(f.relative_to(parts["a"]))] = sha256(f)
        used["a"] += f.stat().st_size
    meta_dir = parts["a"] / "grocery" / "dataset"
    meta_dir.mkdir(parents=True)
    for name in DATASET_FILES:
        if name == "train.txt":  # the lines packed (all, or per_class of each class)
            (meta_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            shutil.copy2(root / "dataset" / name, meta_dir / name)
        files["a"][f"grocery/dataset/{name}"] = sha256(meta_dir / name)
        used["a"] += (meta_dir / name).stat().st_size
    sizes = {rel: (root / "dataset" / rel).stat().st_size for rel in photos}
    half = (used["a"] + sum(sizes.values())) / 2  # part a's share of both, weights included
    for rel in photos:
        src = root / "dataset" / rel
        size = sizes[rel]
        part = "a" if used["a"] + size <= min(room, half) else "b"
        if used[part] + size > room:
            raise DeviceError(f"the photos do not fit in two calls of {limit // MIB} MiB "
                              f"beside a {tree / 1e6:.1f} MB tree")
        dst = parts[part] / "grocery" / "dataset" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        files[part][f"grocery/dataset/{rel}"] = sha256(dst)
        used[part] += size
    parts["b"].mkdir(parents=True, exist_ok=True)
    for name, folder in parts.items():
        (folder / MANIFEST).write_text(json.dumps({"part": name, "files": files[name], "bytes": used[name],
                                                  "site": f"site/{package_dir.name}" if name == "a" else None},
                                                 indent=1) + "\n")
    return {"photos": len(photos), "bytes": used, "room": room, "tree": tree, "spare": limit - tree - max(used.values()),
            "weights_sha256": sha256(weights)}


def check(root: Path, parts: tuple[str, ...] = ("a", "b")) -> dict[str, int]:
    """Every packed file of `parts` present with its sha256; raises DeviceError naming the first missing part."""
    counts = {}
    for name in parts:
        manifest = root / name / MANIFEST
        if not manifest.is_file():
            hint = "the machine went back between the two calls; run both again" if name == "a" else f"carry {root / name}"
            raise DeviceError(f"part {name} is not on this machine ({manifest} missing): {hint}")
        files = json.loads(manifest.read_text())["files"]
        for rel, digest in files.items():
            path = root / name / rel
            if not path.is_file() or sha256(path) != digest:
                raise DeviceError(f"part {name}: {rel} missing or changed; pack again and send it again")
        counts[name] = len(files)
    return counts


def assemble(root: Path, to: Path) -> Path:
    """One dataset folder of both parts (symbolic links), for VISEARCH_GROCERY_DIR."""
    check(root)
    if to.exists():
        shutil.rmtree(to)
    for name in ("a", "b"):
        for rel in json.loads((root / name / MANIFEST).read_text())["files"]:
            if not rel.startswith("grocery/"):
                continue
            dst = to / Path(rel).relative_to("grocery")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / name / rel).resolve(), dst)
    if datasets.grocery_split(to, "train") == []:
        raise DeviceError(f"{to}: no train photos after assembling")
    return to


def collect(runs: list[Path], out: Path, part_bytes: int = PART_BYTES) -> dict:
    """Each run's best.pt in parts of at most `part_bytes`, its progress log, and one manifest, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict] = {}
    for run in runs:
        rec: dict = {"parts": []}
        best = run / "best.pt"
        if best.is_file():
            data = best.read_bytes()
            rec["sha256"] = hashlib.sha256(data).hexdigest()
            for i in range(0, len(data), part_bytes):
                name = f"{run.name}.best.pt.part{i // part_bytes}"
                (out / name).write_bytes(data[i:i + part_bytes])
                rec["parts"].append(name)
        for name in ("history.json", "summary.json"):
            if (run / name).is_file():
                rec[name.split(".")[0]] = json.loads((run / name).read_text() or "null")
        log = run.with_suffix(".log")
        if log.is_file():
            shutil.copy2(log, out / f"{run.name}.log")
        manifest[run.name] = rec
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(src: Path, to: Path) -> dict[str, Path]:
    """Join what `collect` wrote in `src` into `to`/<run>/best.pt (+ history.json, train.log), sha256 checked."""
    manifest = json.loads((src / MANIFEST).read_text())
    done = {}
    for name, rec in manifest.items():
        run = to / name
        run.mkdir(parents=True, exist_ok=True)
        if (src / f"{name}.log").is_file():
            shutil.copy2(src / f"{name}.log", run / "train.log")
        if rec.get("history"):
            (run / "history.json").write_text(json.dumps(rec["history"], indent=2) + "\n")
        if not rec["parts"]:
            continue
        data = b"".join((src / p).read_bytes() for p in rec["parts"])
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise DeviceError(f"{name}: the joined checkpoint's sha256 differs from the one sent; fetch the files again")
        (run / "best.pt").write_bytes(data)
        done[name] = run / "best.pt"
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.training.device", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: the weights and the train photos into .device/a and .device/b")
    p.add_argument("--out", type=Path, default=Path(".device"))
    p.add_argument("--per-class", type=int, default=0, help="at most this many photos of each class (0: all)")
    p.add_argument("--arch", default="efficientnet_lite0")
    p = sub.add_parser("check", help="there: the packed parts are present and intact")
    p.add_argument("--root", type=Path, default=Path(".device"))
    p.add_argument("--parts", default="a,b")
    p = sub.add_parser("assemble", help="there: one dataset folder of both parts")
    p.add_argument("--root", type=Path, default=Path(".device"))
    p.add_argument("--to", type=Path, required=True)
    p = sub.add_parser("collect", help="there: checkpoints in parts, logs and a manifest into --out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+")
    p = sub.add_parser("unpack", help="here: join the parts into runs/<name>/best.pt")
    p.add_argument("--from", dest="src", type=Path, required=True)
    p.add_argument("--to", type=Path, default=Path("runs"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            root = datasets.grocery_root()
            if root is None:
                raise DeviceError(f"grocery dataset not found: set {datasets.ENV_VAR}")
            r = pack(args.out, root, Path.cwd(), args.arch, args.per_class)
            print(json.dumps(r))
            print(f"packed {r['photos']} photos: {args.out}/a {r['bytes']['a'] / 1e6:.1f} MB, {args.out}/b "
                  f"{r['bytes']['b'] / 1e6:.1f} MB beside a {r['tree'] / 1e6:.1f} MB tree; the tree may grow by "
                  f"{r['spare'] / 1e6:.1f} MB before the calls", file=sys.stderr)
        elif args.cmd == "check":
            counts = check(args.root, tuple(args.parts.split(",")))
            print("parts present: " + ", ".join(f"{k} ({v} files)" for k, v in counts.items()))
        elif args.cmd == "assemble":
            print(assemble(args.root, args.to))
        elif args.cmd == "collect":
            m = collect(args.runs, args.out)
            print("collected: " + ", ".join(f"{k} ({len(v['parts'])} parts)" for k, v in m.items()))
        elif args.cmd == "unpack":
            done = unpack(args.src, args.to)
            from .train import load_checkpoint

            for name, path in done.items():
                _, meta = load_checkpoint(path)
                print(f"{name}: {path} epoch {meta['epoch']} {meta['train_split']['selection'].split(':')[0]} "
                      f"mAP {meta['holdout_metrics']['mAP']:.3f}")
    except (DeviceError, OSError, ValueError) as exc:
        print(f"device: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
