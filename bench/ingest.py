"""Ingestion throughput against its raw model forwards: `python -m bench.ingest [--images 1200] [--rounds 3]`.

Side by side in one run, on the same grocery train photos, in --rounds alternating rounds (each
round its own share of the photos, the mesh first in even rounds and the raw forwards first in
odd ones, so a drift of this shared machine's speed falls on both sides):
  mesh     images/s through the gateway, the Redis queue and --workers Celery workers into the
           store (a fresh local mesh with the defaults: detected objects + the full frame, regions
           on), from the first IngestItems call (sent as `visearch ingest` sends a manifest) to the
           job's last stored item (its updated_at);
  raw      ONNX Runtime alone, one intra-op thread per session, in as many processes as workers,
           on inputs decoded and resized beforehand: the forwards ingestion needs (the detector on
           every photo, the embedder with its region outputs on as many crops as the mesh stored
           objects, both at the services' batch sizes: --batch, else 16 and 32), and, for reference,
           the embedder alone on one full frame per photo (raw batched embedding; when the mesh
           stores one full frame per photo without regions, that is the same work and is not run twice).
Before each side the mesh is left to settle (its CPU use falls to nothing: the job's segment
flush is not counted on either side). The ratios mesh / raw are the overhead of everything around
the forwards (decode, queue, gRPC, the store). Prints a markdown table; --out writes result.json
and result.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _raw_worker(args) -> tuple[float, float]:
    """One process: detector over its photos and embedder over its crops; (wall, CPU) seconds."""
    repo, det_inputs, emb_inputs, with_det, with_regions, det_batch, emb_batch, barrier = args
    from bench.common import ort_session

    def session(name: str):
        return ort_session(Path(repo), name)

    def sizes(n: int, batch: int) -> set[int]:
        return {min(batch, n), n % batch} - {0}

    emb, emb_meta = session("embedder")
    names = [emb_meta.output_name, *(emb_meta.region_outputs if with_regions else [])]
    det = det_meta = None
    # Warm-up at every batch size the timed loop runs (the full batch and the remainder): the first
    # forward of a shape plans and allocates its memory, which the long-running services did long ago.
    if with_det:
        det, det_meta = session("detector")
        for n in sizes(len(det_inputs), det_batch):
            det.run(["boxes", "scores"], {det_meta.input_name: det_inputs[:n]})
    for n in sizes(len(emb_inputs), emb_batch):
        emb.run(names, {emb_meta.input_name: emb_inputs[:n]})
    barrier.wait()  # every process loaded and warm: they start together
    t, c = time.perf_counter(), time.process_time()
    if with_det:
        for s in range(0, len(det_inputs), det_batch):
            det.run(["boxes", "scores"], {det_meta.input_name: det_inputs[s:s + det_batch]})
    for s in range(0, len(emb_inputs), emb_batch):
        emb.run(names, {emb_meta.input_name: emb_inputs[s:s + emb_batch]})
    return time.perf_counter() - t, time.process_time() - c


def _raw_process(args, walls) -> None:
    walls.append(_raw_worker(args))


def raw_inputs(repo: Path, photos: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The detector's and the embedder's inputs of each photo, prepared as the services prepare them."""
    from visearch import imaging
    from visearch.detector import prepare as detect_prepare
    from visearch.embedding_model import prepare as embed_prepare
    from visearch.inference import read_meta

    det_meta, emb_meta = read_meta(repo, "detector"), read_meta(repo, "embedder")
    det_x, emb_x = [], []
    for p in photos:
        data = p.read_bytes()
        det_x.append(detect_prepare(imaging.decode_image(data), det_meta.input_size)[0])
        emb_x.append(embed_prepare(data, None, emb_meta.input_size)[0])
    return np.stack(det_x), np.stack(emb_x)


def raw_wall(repo: Path, det_x: np.ndarray, emb_x: np.ndarray, procs: int, detect: bool, regions: bool,
             det_batch: int, emb_batch: int) -> float:
    """Wall seconds of the detector on det_x (if detect) and the embedder on emb_x, split over
    `procs` processes that start together; the slowest one's time is the whole batch's."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier, walls = manager.Barrier(procs), manager.list()
        workers = [ctx.Process(target=_raw_process, args=((str(repo), det_x[i::procs], emb_x[i::procs], detect,
                                                            regions, det_batch, emb_batch, barrier), walls))
                   for i in range(procs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if len(walls) != procs:
            raise RuntimeError(f"{procs - len(walls)} raw benchmark processes failed")
        return max(w for w, _ in walls)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that were waited for, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime


def component_cpu(state: dict) -> dict[str, float]:
    """CPU seconds so far of each mesh component (a Celery worker with its pool children)."""
    out = {}
    for c in state["components"]:
        if not c["pid"]:
            continue
        try:
            children = [int(p) for p in Path(f"/proc/{c['pid']}/task/{c['pid']}/children").read_text().split()]
        except OSError:
            children = []
        out[c["name"]] = round(sum(cpu_seconds(p) for p in [c["pid"], *children]), 2)
    return out


def settle(state: dict, quiet_s: float = 0.5, max_s: float = 20.0) -> None:
    """Wait until the mesh is at rest: under 5 % of a core in all over a `quiet_s` window."""
    end = time.monotonic() + max_s
    before = sum(component_cpu(state).values())
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = sum(component_cpu(state).values())
        if now - before < 0.05 * quiet_s:
            return
        before = now


def mesh_round(vs, state: dict, store, photos: list[Path], tag: str, progress) -> dict:
    """Ingest `photos` as new items of the catalog "bench" the way `visearch ingest` sends a manifest;
    images/s from the first request to the job's last stored item, and each component's CPU seconds."""
    from visearch.sdk import ingest_rows

    rows = [{"item_id": f"{tag}i{i}", "path": p, "metadata": {}} for i, p in enumerate(photos)]
    before = store.count("bench")
    cpu0 = component_cpu(state)
    t0 = time.time()
    job_id, local = ingest_rows(vs, rows, "bench", by_path=False)
    if local:
        raise RuntimeError(f"photos not readable: {local}")
    seen = [0]

    def report(st):
        if st.done + st.failed >= seen[0] + 100:
            seen[0] = st.done + st.failed
            progress(f"{tag}: ingested {st.done}/{st.submitted}")

    job = vs.wait(job_id, poll=0.25, on_progress=report)
    cpu1 = component_cpu(state)
    # The job's updated_at is the moment its last item was recorded (set by the worker, same
    # machine and clock): the poll's granularity does not add to the wall time.
    wall = job.updated_at - t0
    objects = store.count("bench") - before
    return {"images": job.done, "failed": job.failed, "objects": objects, "wall_s": round(wall, 2),
            "images_per_s": round(job.done / wall, 2),
            "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}}


def run(n_images: int, workers: int, out: Path | None, progress=print, objects: str = "detected+full",
        regions: bool = True, batch: int = 0, rounds: int = 3, warm_up: int | None = None) -> dict:
    from bench.common import mesh_up, write_result
    from visearch import mesh
    from visearch.client import Client
    from visearch.datasets import grocery_root, grocery_split
    from visearch.settings import (
        DEFAULT_MODEL_REPOSITORY,
        DetectionSettings,
        EmbeddingSettings,
        QueueSettings,
        StoreSettings,
        WorkerSettings,
    )
    from visearch.store import VectorStore

    # The services' largest batch (VISEARCH_MAX_BATCH; default: their settings), and the raw forwards
    # run at the same sizes.
    det_batch = batch or DetectionSettings.model_fields["max_batch"].default
    emb_batch = batch or EmbeddingSettings.model_fields["max_batch"].default
    # A task carries `ingest_batch` photos, and each service forwards what one call brings (up to
    # its largest batch): the raw side runs forwards of those same sizes. (Per image, a forward of
    # 32 costs this CPU about 12 % more than one of 16: docs/PERFORMANCE.md, the batching curve.)
    task = int(os.environ.get("VISEARCH_INGEST_BATCH") or QueueSettings.model_fields["ingest_batch"].default)
    env = {"VISEARCH_INGEST_OBJECTS": objects, "VISEARCH_INGEST_REGIONS": str(regions).lower(),
           "VISEARCH_CATALOG_REGIONS": "float" if regions else "off"}
    if batch:
        env["VISEARCH_MAX_BATCH"] = str(batch)
    detect = objects != "full"
    separate_reference = detect or regions  # else the same forwards are raw batched embedding itself
    # Warm-up on other photos: two tasks for every task slot (workers x concurrency), so every
    # pool child has made its clients and every model session has run before the clock starts.
    concurrency = int(os.environ.get("VISEARCH_WORKER_CONCURRENCY") or WorkerSettings.model_fields["worker_concurrency"].default)
    n_warm = 2 * workers * concurrency * task if warm_up is None else warm_up
    train = [p.path for p in grocery_split(grocery_root(), "train")]
    if n_images + n_warm > len(train):
        raise SystemExit(f"--images {n_images}: the train split has {len(train)} photos, {n_warm} of them for the warm-up")
    # Spread evenly over the split (it is ordered by class: fruit and vegetables first, then the
    # packaged products, on which the detector finds more objects), and so is the warm-up.
    picked = set(np.linspace(0, len(train), n_images, endpoint=False).astype(int).tolist())
    photos = [train[i] for i in sorted(picked)]
    rest = [p for i, p in enumerate(train) if i not in picked]
    warm = [rest[i] for i in np.linspace(0, len(rest), n_warm, endpoint=False).astype(int)] if n_warm else []
    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    progress(f"preparing the raw inputs of {len(photos)} photos")
    det_x, emb_x = raw_inputs(repo, photos)
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mesh"
        state = mesh_up(data, env, workers=workers)
        try:
            milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
            store = VectorStore(StoreSettings(milvus_uri=milvus))
            with Client(state["gateway"], api_key=mesh.read_admin_key(data), timeout=120) as vs:
                vs.wait(vs.ingest_paths({f"warm{i}": p for i, p in enumerate(warm)}, catalog="bench").job_id)
                for r in range(rounds):
                    idx = np.arange(r, len(photos), rounds)
                    group = [photos[i] for i in idx]
                    sides = ("mesh", "raw") if r % 2 == 0 else ("raw", "mesh")
                    res: dict = {"round": r + 1, "order": " then ".join(sides)}
                    for side in sides:
                        settle(state)
                        if side == "mesh":
                            res["mesh"] = mesh_round(vs, state, store, group, f"r{r + 1}", progress)
                            continue
                        # As many crops as the mesh stored: its count in this round when it went
                        # first, else (raw first, with detection) at the rate of the rounds before.
                        if "mesh" in res:
                            n_obj = res["mesh"]["objects"]
                        elif not detect:
                            n_obj = len(idx)
                        else:
                            done = [x["mesh"] for x in per_round]
                            n_obj = round(len(idx) * sum(m["objects"] for m in done) / sum(m["images"] for m in done))
                        cpu0 = component_cpu(state)
                        own0 = cpu_seconds(os.getpid())
                        res["raw"] = raw_side(repo, det_x[idx], emb_x[idx], n_obj, workers, detect, regions,
                                              min(det_batch, task), min(emb_batch, max(1, round(task * n_obj / len(idx)))))
                        if separate_reference:
                            res["raw"]["embed_only"] = round(len(idx) / raw_wall(
                                repo, det_x[idx], emb_x[idx], workers, False, False, det_batch, min(emb_batch, task)), 2)
                        cpu1 = component_cpu(state)
                        # What the idle mesh used meanwhile (its health checks, Milvus's own timers).
                        res["raw"]["mesh_cpu_s"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
                        res["raw"]["bench_cpu_s"] = round(cpu_seconds(os.getpid()) - own0, 2)
                    if not separate_reference:
                        res["raw"]["embed_only"] = res["raw"]["same_forwards"]
                    res["mesh_over_raw"] = round(res["mesh"]["images_per_s"] / res["raw"]["same_forwards"], 3)
                    progress(f"round {r + 1}: mesh {res['mesh']['images_per_s']} images/s, raw "
                             f"{res['raw']['same_forwards']}: {res['mesh_over_raw']}x")
                    per_round.append(res)
            store.close()
        finally:
            mesh.down(data, log=lambda m: None)
    result = summarize(per_round, workers, concurrency, detect, regions, objects, det_batch, emb_batch)
    write_result(out, result, markdown(result))
    return result


def raw_side(repo: Path, det_x: np.ndarray, emb_x: np.ndarray, n_obj: int, procs: int, detect: bool, regions: bool,
             det_batch: int, emb_batch: int) -> dict:
    """Images/s of the forwards the mesh ran: the detector on each photo (if detect) and the
    embedder on n_obj crops (a crop costs what a full frame costs: the same input size), at the
    batch sizes the services ran them."""
    crops = emb_x[np.arange(n_obj) % len(emb_x)]
    ips = round(len(emb_x) / raw_wall(repo, det_x, crops, procs, detect, regions, det_batch, emb_batch), 2)
    return {"crops": n_obj, "batch": {"detector": det_batch if detect else 0, "embedder": emb_batch}, "same_forwards": ips}


def summarize(per_round: list[dict], workers: int, concurrency: int, detect: bool, regions: bool, objects: str, det_batch: int,
              emb_batch: int) -> dict:
    """Pooled over the rounds (all images over all wall time, on each side) and per round."""
    images = sum(r["mesh"]["images"] for r in per_round)
    mesh_wall = sum(r["mesh"]["wall_s"] for r in per_round)

    def pooled(key: str) -> float:
        return round(images / sum(r["mesh"]["images"] / r["raw"][key] for r in per_round), 2)

    mesh_ips = round(images / mesh_wall, 2)
    raw = {k: pooled(k) for k in ("same_forwards", "embed_only")}
    cpu: dict[str, float] = {}
    for r in per_round:
        for k, v in r["mesh"]["cpu_s"].items():
            cpu[k] = cpu.get(k, 0.0) + v  # rounded once, at the end (not per round)
    n_objects = sum(r["mesh"]["objects"] for r in per_round)
    return {"policy": {"ingest_objects": objects, "ingest_regions": regions, "detect": detect,
                       "max_batch": {"detection": det_batch, "embedding": emb_batch},
                       "worker_concurrency": concurrency},
            "images": images, "failed": sum(r["mesh"]["failed"] for r in per_round), "workers": workers,
            "rounds": per_round, "objects": n_objects, "objects_per_image": round(n_objects / max(1, images), 2),
            "cpu_seconds_by_component": {k: round(v, 2) for k, v in cpu.items() if v >= 0.005}, "wall_s": round(mesh_wall, 1),
            "mesh_images_per_s": mesh_ips, "raw_images_per_s": raw,
            "mesh_over_raw": round(mesh_ips / raw["same_forwards"], 3),
            "mesh_over_raw_embedding_only": round(mesh_ips / raw["embed_only"], 3),
            "mesh_over_raw_by_round": [r["mesh_over_raw"] for r in per_round],
            "mesh_over_raw_median_round": round(statistics.median(r["mesh_over_raw"] for r in per_round), 3)}


def markdown(r: dict) -> str:
    raw, pol = r["raw_images_per_s"], r["policy"]
    same = ("detector + " if pol["detect"] else "") + "embedder" + (" (with regions)" if pol["ingest_regions"] else "")
    rows = [f"| {x['round']} ({x['order']}) | {x['mesh']['images']} | {x['mesh']['images_per_s']} | "
            f"{x['raw']['same_forwards']} | {x['mesh_over_raw']} |" for x in r["rounds"]]
    return "\n".join([
        f"{r['images']} grocery photos in {len(r['rounds'])} rounds, {r['workers']} workers (concurrency "
        f"{pol['worker_concurrency']} each), ingest_objects={pol['ingest_objects']}, batches of "
        f"{pol['max_batch']['detection']} (detector) and {pol['max_batch']['embedding']} (embedder), "
        f"ingest_regions={pol['ingest_regions']}; {r['objects']} objects stored ({r['objects_per_image']} per photo).",
        "",
        "| | images/s | mesh / this |",
        "|---|---:|---:|",
        f"| mesh: gateway -> queue -> workers -> store | {r['mesh_images_per_s']} | |",
        f"| raw: {same} on the same objects | {raw['same_forwards']} | {r['mesh_over_raw']} |",
        f"| raw: embedder alone, one full frame per photo | {raw['embed_only']} | {r['mesh_over_raw_embedding_only']} |",
        "",
        "| round | images | mesh images/s | raw (same forwards) images/s | mesh / raw |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Median of the rounds' ratios: {r['mesh_over_raw_median_round']}. CPU seconds of the mesh's rounds, by "
        "component: " + ", ".join(f"{k} {v}" for k, v in r["cpu_seconds_by_component"].items())
        + f" (wall {r['wall_s']} s, 2 cores).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1200, help="photos in all, split over the rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternating mesh/raw rounds, each on its own photos")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0,
                    help="The services' largest batch (VISEARCH_MAX_BATCH) and the raw forwards' (0: the defaults).")
    ap.add_argument("--objects", default="detected+full", help="VISEARCH_INGEST_OBJECTS for the mesh: full, detected, "
                    "detected+full")
    ap.add_argument("--no-regions", action="store_true", help="VISEARCH_INGEST_REGIONS=false for the mesh")
    ap.add_argument("--warm-up", type=int, default=None,
                    help="photos ingested before the clock starts (default: two tasks per worker pool child)")
    ap.add_argument("--out", type=Path, default=Path("runs/ingest"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.images < args.rounds:
        ap.error("--rounds must be at least 1 and at most --images")
    print(markdown(run(args.images, args.workers, args.out, objects=args.objects, regions=not args.no_regions,
                       batch=args.batch, rounds=args.rounds, warm_up=args.warm_up)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
