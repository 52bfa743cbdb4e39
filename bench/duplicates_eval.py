"""Near-duplicate detection through the mesh: planted copies found, and no false group.

    python -m bench.duplicates_eval --out runs/duplicates [--photos 600] [--planted 40] [--offset 5] [--model DIR]

A fresh mesh with the defaults. The catalog: --photos grocery train photos (every 4th from --offset,
so near-identical shots of one product sit side by side in it) plus, for --planted of them, four
made-up copies each, ingested as items of their own: re-encoded (JPEG quality 40), resized (0.6x),
cropped 5 % and cropped 10 % (cut evenly, then from one corner). Then `visearch duplicates --json`.
Right: a group that is exactly one planted photo and its copies. Reported: planted groups found
whole, copies missed, false groups (any group with items of two different original photos), and
how long the scan took. Every setting of the rule was chosen on other train photos (offset 0,
docs/DUPLICATES.md); the default --offset 5 keeps these photos apart from them. Prints a markdown
table; --out writes result.json and result.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from bench.common import cli_env, grocery_root, show

ROOT = Path(__file__).resolve().parents[1]
COPIES = ("q40", "small", "crop5", "corner10")


def copies(path: Path, out: Path) -> dict[str, Path]:
    """The made-up copies of one photo, as files under `out`."""
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    made = {"q40": (img, 40), "small": (cv2.resize(img, (int(w * 0.6), int(h * 0.6)), interpolation=cv2.INTER_AREA), 90),
            "crop5": (img[int(h * 0.025):h - int(h * 0.025), int(w * 0.025):w - int(w * 0.025)], 90),
            "corner10": (img[:int(h * 0.9), :int(w * 0.9)], 90)}
    files = {}
    for kind, (im, quality) in made.items():
        files[kind] = out / f"{path.stem}-{kind}.jpg"
        cv2.imwrite(str(files[kind]), im, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return files


def run(photos: int, planted: int, offset: int, model: Path | None, progress=print) -> dict:
    from bench.common import mesh_up
    from visearch import datasets, mesh

    root = grocery_root()
    train = datasets.grocery_split(root, "train")[offset::4][:photos]
    data = Path(tempfile.mkdtemp(prefix="duplicates-"))
    made = data / "copies"
    made.mkdir()
    rows = [(f"p{n:05d}", p.path) for n, p in enumerate(train)]
    origin = {item: item for item, _ in rows}
    step = max(1, len(rows) // max(1, planted))
    for item, path in rows[::step][:planted]:
        for kind, f in copies(path, made).items():
            rows.append((f"{item}-{kind}", f))
            origin[f"{item}-{kind}"] = item
    manifest = data / "catalog.csv"
    manifest.write_text("item_id,path\n" + "".join(f"{i},{p}\n" for i, p in rows))
    env = cli_env(data, model)
    mesh_up(data, {"VISEARCH_MODEL_REPOSITORY": str(model)} if model else {})
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "visearch.cli", "ingest", "--manifest", str(manifest), "--catalog", "shop",
                        "--wait"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        progress(f"ingested {len(rows)} photos in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "visearch.cli", "duplicates", "--catalog", "shop", "--json"], env=env,
                           check=True, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t
    finally:
        mesh.down(data, log=lambda m: None)
    found = json.loads(r.stdout)
    planted_sets = {}
    for item, o in origin.items():
        if item != o:
            planted_sets.setdefault(o, {o}).add(item)
    groups = [set(g) for g in found["groups"]]
    whole = sum(1 for s in planted_sets.values() if s in groups)
    false = [sorted(g) for g in groups if len({origin[i] for i in g}) > 1]
    in_groups = set().union(*groups) if groups else set()
    missed = sorted(i for i, o in origin.items() if i != o and i not in in_groups)
    missed_by_kind = {k: sum(m.endswith("-" + k) for m in missed) for k in COPIES}
    return {"photos": len(train), "planted": len(planted_sets), "items": found["items"], "groups": len(groups),
            "planted_groups_whole": whole, "copies": sum(len(s) - 1 for s in planted_sets.values()),
            "copies_missed": len(missed), "missed_by_kind": missed_by_kind, "false_groups": false,
            "pairs_checked": found["pairs_checked"], "scan_seconds": round(seconds, 1), "offset": offset,
            "min_ncc": found["min_ncc"]}


def markdown(r: dict) -> str:
    return ("| catalog items | planted photos (4 copies each) | groups found | planted groups whole | copies missed | "
            "false groups | pairs checked | scan s |\n|---|---|---|---|---|---|---|---|\n"
            f"| {r['items']} | {r['planted']} | {r['groups']} | {r['planted_groups_whole']}/{r['planted']} | "
            f"{r['copies_missed']}/{r['copies']} | {len(r['false_groups'])} | {r['pairs_checked']} | {r['scan_seconds']:g} |\n\n"
            f"Copies missed by kind: {r['missed_by_kind']}. False groups: {r['false_groups'][:5]}.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--photos", type=int, default=600, help="distinct train photos in the catalog")
    ap.add_argument("--planted", type=int, default=40, help="photos given four made-up copies each")
    ap.add_argument("--offset", type=int, default=5, help="first train photo (every 4th after it)")
    ap.add_argument("--model", type=Path, default=None, help="model repository (default: the project's)")
    args = ap.parse_args(argv)
    r = run(args.photos, args.planted, args.offset, args.model)
    return show(args.out, r, markdown(r))


if __name__ == "__main__":
    raise SystemExit(main())
