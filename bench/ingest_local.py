"""What local features cost at ingestion: `python -m bench.ingest_local [--images 300] [--rounds 4]`.

Two fresh local meshes with the defaults, one of them with VISEARCH_INGEST_LOCAL_FEATURES=false
(its workers ask the embedding service for no local features), up side by side in one run. Each
round ingests its own share of the grocery train photos into both, in alternating order (the
mesh with local features first in even rounds, last in odd ones) so that a drift of this shared
machine's speed falls on both sides; each side starts from a settled mesh (bench.ingest's rules:
images/s from the first IngestItems call to the job's last stored item, CPU seconds per
component from /proc). Also the bytes of local features stored per object (the files under the
mesh's local folder, over the objects stored). Prints a markdown table; --out writes result.json
and result.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

SIDES = ("with", "without")


def local_bytes(store) -> tuple[int, int]:
    """(files, bytes) of the local features stored for the "bench" catalog (its live generation)."""
    live = store.live("bench")  # none yet without a warm-up
    return (store.local.count(live.collection), store.local.bytes_used(live.collection)) if live else (0, 0)


def run(n_images: int, rounds: int, workers: int, out: Path | None, progress=print, warm_up: int = 16) -> dict:
    from bench.common import mesh_up, write_result
    from bench.ingest import mesh_round, settle
    from visearch import mesh
    from visearch.client import Client
    from visearch.datasets import grocery_root, grocery_split
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    train = [p.path for p in grocery_split(grocery_root(), "train")]
    if n_images + warm_up > len(train):
        raise SystemExit(f"--images {n_images}: the train split has {len(train)} photos, {warm_up} for the warm-up")
    # Spread over the split (ordered by class), as bench.ingest picks them.
    picked = np.linspace(0, len(train), n_images + warm_up, endpoint=False).astype(int)
    warm_at = set(np.linspace(0, len(picked), warm_up, endpoint=False).astype(int).tolist()) if warm_up else set()
    warm = [train[i] for k, i in enumerate(picked) if k in warm_at]
    photos = [train[i] for k, i in enumerate(picked) if k not in warm_at]
    per_round: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        meshes = {}
        try:
            for side in SIDES:
                data = Path(tmp) / side
                env = {"VISEARCH_INGEST_LOCAL_FEATURES": "true" if side == "with" else "false"}
                state = mesh_up(data, env, workers=workers)
                milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
                vs = Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=120)
                local_dir = state["settings"]["VISEARCH_LOCAL_DIR"]  # the folder the mesh's workers write
                meshes[side] = {"data": data, "state": state, "vs": vs,
                                "store": VectorStore(StoreSettings(milvus_uri=milvus, local_dir=local_dir))}
                if warm:
                    vs.wait(vs.ingest_paths({f"warm{i}": p for i, p in enumerate(warm)}, catalog="bench").job_id)
            for side in SIDES:
                meshes[side]["warm"] = local_bytes(meshes[side]["store"])
            for r in range(rounds):
                group = [photos[i] for i in range(r, len(photos), rounds)]
                order = SIDES if r % 2 == 0 else SIDES[::-1]
                res: dict = {"round": r + 1, "order": " then ".join(order)}
                for side in order:
                    for m in meshes.values():
                        settle(m["state"])
                    m = meshes[side]
                    res[side] = mesh_round(m["vs"], m["state"], m["store"], group, f"r{r + 1} {side}", progress)
                res["without_over_with"] = round(res["without"]["images_per_s"] / res["with"]["images_per_s"], 3)
                progress(f"round {r + 1}: with local features {res['with']['images_per_s']} images/s, without "
                         f"{res['without']['images_per_s']}: {res['without_over_with']}x")
                per_round.append(res)
            stored = {side: local_bytes(meshes[side]["store"]) for side in SIDES}
            result = summarize(per_round, stored, {s: meshes[s]["warm"] for s in SIDES}, workers)
        finally:
            for m in meshes.values():
                m["store"].close()
                m["vs"].close()
                mesh.down(m["data"], log=lambda msg: None)
    write_result(out, result, markdown(result))
    return result


def summarize(per_round: list[dict], stored: dict, warm: dict, workers: int) -> dict:
    """Pooled over the rounds: images over wall time per side, CPU seconds per photo per component."""
    out: dict = {"workers": workers, "rounds": per_round}
    for side in SIDES:
        images = sum(x[side]["images"] for x in per_round)
        wall = sum(x[side]["wall_s"] for x in per_round)
        cpu: dict[str, float] = {}
        for x in per_round:
            for k, v in x[side]["cpu_s"].items():
                cpu[k] = cpu.get(k, 0.0) + v
        objects = sum(x[side]["objects"] for x in per_round)
        files = stored[side][0] - warm[side][0]
        nbytes = stored[side][1] - warm[side][1]
        out[side] = {"images": images, "failed": sum(x[side]["failed"] for x in per_round), "objects": objects,
                     "images_per_s": round(images / wall, 2),
                     "cpu_ms_per_image": {k: round(1000 * v / max(1, images), 1) for k, v in sorted(cpu.items())},
                     "local_files": files, "local_bytes_per_object": round(nbytes / max(1, objects), 1)}
    out["without_over_with"] = round(out["without"]["images_per_s"] / out["with"]["images_per_s"], 3)
    out["embedding_cpu_ms_per_image_for_local_features"] = round(
        out["with"]["cpu_ms_per_image"].get("embedding", 0.0) - out["without"]["cpu_ms_per_image"].get("embedding", 0.0), 1)
    return out


def markdown(r: dict) -> str:
    rows = [f"| {x['round']} ({x['order']}) | {x['with']['images']} | {x['with']['images_per_s']} | "
            f"{x['without']['images_per_s']} | {x['without_over_with']} |" for x in r["rounds"]]
    w, wo = r["with"], r["without"]
    return "\n".join([
        f"Ingestion with and without local features, {w['images']} grocery photos a side in {len(r['rounds'])} "
        f"rounds, {r['workers']} worker(s) a mesh, two fresh meshes with the defaults:",
        "",
        "| round | photos | with local features, images/s | without, images/s | without / with |",
        "|---|---:|---:|---:|---:|",
        *rows,
        f"| **pooled** | {w['images']} | **{w['images_per_s']}** | **{wo['images_per_s']}** | **{r['without_over_with']}** |",
        "",
        f"Embedding service CPU per photo: {w['cpu_ms_per_image'].get('embedding', 0)} ms with, "
        f"{wo['cpu_ms_per_image'].get('embedding', 0)} ms without "
        f"({r['embedding_cpu_ms_per_image_for_local_features']} ms a photo for local features). "
        f"Local features stored: {w['local_files']} files for {w['objects']} objects, "
        f"{w['local_bytes_per_object']} bytes per object (without: {wo['local_files']} files).",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="photos a side, split over the rounds")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds, each on its own photos")
    ap.add_argument("--workers", type=int, default=1, help="Celery workers per mesh")
    ap.add_argument("--warm-up", type=int, default=16, help="photos ingested into each mesh before the clock starts")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.images < args.rounds:
        ap.error("--rounds must be at least 1 and at most --images")
    r = run(args.images, args.rounds, args.workers, args.out, warm_up=args.warm_up)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
