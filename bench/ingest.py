"""Ingestion throughput against its raw model forwards: `python -m bench.ingest [--images 400] [--workers 2]`.

Side by side in one run, on the same grocery train photos:
  mesh     images/s through the gateway, the Redis queue and --workers Celery workers into the
           store (a fresh local mesh with the defaults: detected objects + the full frame, regions
           on), from the first IngestItems call to the job's last item;
  raw      ONNX Runtime alone, one intra-op thread per session, in as many processes as workers,
           on inputs decoded and resized beforehand: the forwards ingestion needs (the detector on
           every photo, the embedder with its region outputs on as many crops as the mesh stored
           objects, both at the services' batch sizes: --batch, else 16 and 32), and, for reference, the embedder alone
           on one full frame per photo (raw batched embedding).
The ratios mesh / raw are the overhead of everything around the forwards (decode, queue, gRPC,
the store). Prints a markdown table; --out writes result.json and result.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _raw_worker(args) -> float:
    """One process: detector over its photos and embedder over its crops; wall seconds."""
    repo, det_inputs, emb_inputs, with_det, with_regions, det_batch, emb_batch, barrier = args
    from bench.common import ort_session

    def session(name: str):
        return ort_session(Path(repo), name)

    emb, emb_meta = session("embedder")
    names = [emb_meta.output_name, *(emb_meta.region_outputs if with_regions else [])]
    det = det_meta = None
    if with_det:
        det, det_meta = session("detector")
        det.run(["boxes", "scores"], {det_meta.input_name: det_inputs[:1]})
    emb.run(names, {emb_meta.input_name: emb_inputs[:1]})  # warm-up
    barrier.wait()  # every process loaded and warm: they start together
    t = time.perf_counter()
    if with_det:
        for s in range(0, len(det_inputs), det_batch):
            det.run(["boxes", "scores"], {det_meta.input_name: det_inputs[s:s + det_batch]})
    for s in range(0, len(emb_inputs), emb_batch):
        emb.run(names, {emb_meta.input_name: emb_inputs[s:s + emb_batch]})
    return time.perf_counter() - t


def _raw_process(args, walls) -> None:
    walls.append(_raw_worker(args))


def raw_throughput(repo: Path, photos: list[Path], objects_per_image: float, procs: int, detect: bool = True,
                   regions: bool = True, det_batch: int = 16, emb_batch: int = 32) -> dict:
    """Images/s of the raw forwards in `procs` processes at once (each a share of the photos)."""
    from services.embedding.server import prepare as embed_prepare
    from visearch import imaging
    from visearch.detector import prepare as detect_prepare
    from visearch.inference import read_meta

    det_meta, emb_meta = read_meta(repo, "detector"), read_meta(repo, "embedder")
    det_x, emb_x = [], []
    for p in photos:
        data = p.read_bytes()
        det_x.append(detect_prepare(imaging.decode_image(data), det_meta.input_size)[0])
        emb_x.append(embed_prepare(data, None, emb_meta.input_size)[0])
    det_x, emb_x = np.stack(det_x), np.stack(emb_x)
    n_obj = int(round(objects_per_image * len(photos)))
    crops = emb_x[np.arange(n_obj) % len(emb_x)]  # a crop costs what a full frame costs: same input size
    out = {}
    ctx = mp.get_context("spawn")
    for label, with_det, with_regions, x in (("same_forwards", detect, regions, crops), ("embed_only", False, False, emb_x)):
        with ctx.Manager() as manager:
            barrier, walls = manager.Barrier(procs), manager.list()
            workers = [ctx.Process(target=_raw_process, args=((str(repo), det_x[i::procs], x[i::procs], with_det,
                                                                with_regions, det_batch, emb_batch, barrier), walls))
                       for i in range(procs)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if len(walls) != procs:
                raise RuntimeError(f"{procs - len(walls)} raw benchmark processes failed")
            # They start together (barrier) and each times its own forwards: the slowest one's time
            # is the wall time of the whole batch.
            wall = max(walls)
        out[label] = round(len(photos) / wall, 2)
    return out


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


def run(n_images: int, workers: int, out: Path | None, progress=print, objects: str = "detected+full",
        regions: bool = True, batch: int = 0) -> dict:
    from bench.common import mesh_up, write_result
    from visearch import mesh
    from visearch.client import Client
    from visearch.datasets import grocery_root, grocery_split
    from visearch.settings import DEFAULT_MODEL_REPOSITORY, DetectionSettings, EmbeddingSettings, StoreSettings
    from visearch.store import VectorStore

    # The services' largest batch (VISEARCH_MAX_BATCH; default: their settings), and the raw forwards
    # run at the same sizes.
    det_batch = batch or DetectionSettings.model_fields["max_batch"].default
    emb_batch = batch or EmbeddingSettings.model_fields["max_batch"].default
    env = {"VISEARCH_INGEST_OBJECTS": objects, "VISEARCH_INGEST_REGIONS": str(regions).lower()}
    if batch:
        env["VISEARCH_MAX_BATCH"] = str(batch)
    train = grocery_split(grocery_root(), "train")
    photos = [p.path for p in train[:: max(1, len(train) // n_images)][:n_images]]
    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mesh"
        state = mesh_up(data, env, workers=workers)
        try:
            key = mesh.read_admin_key(data)
            with Client(state["gateway"], api_key=key, timeout=120) as vs:
                # Warm-up: sessions, the catalog, every worker's channels.
                job = vs.ingest_paths({f"warm{i}": p for i, p in enumerate(photos[:4 * workers])}, catalog="warm")
                vs.wait(job.job_id)
                cpu0 = component_cpu(state)
                t = time.perf_counter()
                job = vs.ingest_paths({f"i{i}": p for i, p in enumerate(photos)}, catalog="bench")
                seen = [0]

                def report(st):
                    if st.done + st.failed >= seen[0] + 50:
                        seen[0] = st.done + st.failed
                        progress(f"ingested {st.done}/{st.submitted}")

                done = vs.wait(job.job_id, poll=0.2, on_progress=report)
                wall = time.perf_counter() - t
                cpu1 = component_cpu(state)
            cpu = {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1 if cpu1[k] - cpu0.get(k, 0.0) >= 0.05}
            milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
            store = VectorStore(StoreSettings(milvus_uri=milvus))
            n_objects = store.count("bench")
            store.close()
        finally:
            mesh.down(data, log=lambda m: None)
    mesh_ips = round(done.done / wall, 2)
    per_image = n_objects / max(1, done.done)
    progress(f"mesh: {done.done} images, {n_objects} objects in {wall:.1f} s = {mesh_ips} images/s; CPU s {cpu}")
    raw = raw_throughput(repo, photos, per_image, workers, detect=objects != "full", regions=regions,
                         det_batch=det_batch, emb_batch=emb_batch)
    result = {"policy": {"ingest_objects": objects, "ingest_regions": regions,
                         "max_batch": {"detection": det_batch, "embedding": emb_batch},
                         "worker_concurrency": int(os.environ.get("VISEARCH_WORKER_CONCURRENCY") or 1)},
              "images": done.done, "failed": done.failed, "workers": workers, "objects": n_objects,
              "cpu_seconds_by_component": cpu, "wall_s": round(wall, 1),
              "objects_per_image": round(per_image, 2), "mesh_images_per_s": mesh_ips,
              "raw_images_per_s": raw, "mesh_over_raw": round(mesh_ips / raw["same_forwards"], 3),
              "mesh_over_raw_embedding_only": round(mesh_ips / raw["embed_only"], 3)}
    write_result(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    raw, pol = r["raw_images_per_s"], r["policy"]
    same = ("detector + " if pol["ingest_objects"] != "full" else "") + "embedder" + (
        " (with regions)" if pol["ingest_regions"] else "")
    return "\n".join([
        f"{r['images']} grocery photos, {r['workers']} workers (concurrency {pol['worker_concurrency']} each), "
        f"ingest_objects={pol['ingest_objects']}, batches of {pol['max_batch']['detection']} (detector) and "
        f"{pol['max_batch']['embedding']} (embedder), "
        f"ingest_regions={pol['ingest_regions']}; {r['objects']} objects stored ({r['objects_per_image']} per photo).",
        "",
        "| | images/s | mesh / this |",
        "|---|---:|---:|",
        f"| mesh: gateway -> queue -> workers -> store | {r['mesh_images_per_s']} | |",
        f"| raw: {same} on the same objects | {raw['same_forwards']} | {r['mesh_over_raw']} |",
        f"| raw: embedder alone, one full frame per photo | {raw['embed_only']} | {r['mesh_over_raw_embedding_only']} |",
        "",
        "CPU seconds during the ingest, by component: " + ", ".join(f"{k} {v}" for k, v in r["cpu_seconds_by_component"].items())
        + f" (wall {r['wall_s']} s, 2 cores).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0,
                    help="The services' largest batch (VISEARCH_MAX_BATCH) and the raw forwards' (0: the defaults).")
    ap.add_argument("--objects", default="detected+full", help="VISEARCH_INGEST_OBJECTS for the mesh: full, detected, "
                    "detected+full")
    ap.add_argument("--no-regions", action="store_true", help="VISEARCH_INGEST_REGIONS=false for the mesh")
    ap.add_argument("--out", type=Path, default=Path("runs/ingest"))
    args = ap.parse_args(argv)
    print(markdown(run(args.images, args.workers, args.out, objects=args.objects, regions=not args.no_regions,
                       batch=args.batch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
