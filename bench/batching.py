"""The batching curve of the served models: `python -m bench.batching [--sizes 1,2,4,8,16,32] [--out runs/batching]`.

For each batch size, side by side in one run on the same grocery val photos:
  raw        ONNX Runtime in this process, one intra-op thread: the detector and the embedder
             (global output only, and with its region outputs), ms per batch (median of --repeats
             after a warm-up) and images/s;
  service    the embedding service's Embed RPC with that many photos in one request (a fresh
             local mesh; decode, resize, the forward, protobuf and gRPC), ms per request and images/s.
Prints a markdown table; --out writes result.json, result.md and curve.png (images/s against
batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.median(ts))


def raw_curve(repo: Path, photos: list[Path], sizes: list[int], repeats: int) -> dict:
    from bench.common import ort_session as session
    from visearch import imaging
    from visearch.detector import prepare as detect_prepare
    from visearch.embedding_model import prepare as embed_prepare

    det, dm = session(repo, "detector")
    emb, em = session(repo, "embedder")
    n = max(sizes)
    data = [p.read_bytes() for p in (photos * n)[:n]]
    xd = np.stack([detect_prepare(imaging.decode_image(d), dm.input_size)[0] for d in data])
    xe = np.stack([embed_prepare(d, None, em.input_size)[0] for d in data])
    out = {"detector": {}, "embedder": {}, "embedder+regions": {}}
    for b in sizes:
        out["detector"][b] = _median_ms(lambda b=b: det.run(["boxes", "scores"], {dm.input_name: xd[:b]}), repeats)
        out["embedder"][b] = _median_ms(lambda b=b: emb.run([em.output_name], {em.input_name: xe[:b]}), repeats)
        out["embedder+regions"][b] = _median_ms(
            lambda b=b: emb.run([em.output_name, *em.region_outputs], {em.input_name: xe[:b]}), repeats)
    return out


def service_curve(photos: list[Path], sizes: list[int], repeats: int) -> dict:
    """ms per Embed request of b photos, through a fresh local mesh's embedding service."""
    import grpc

    from visearch import mesh
    from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    n = max(sizes)
    data = [p.read_bytes() for p in (photos * n)[:n]]
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "mesh"
        state = mesh.up(d, log=lambda m: None)
        try:
            addr = next(c["address"] for c in state["components"] if c["name"] == "embedding")
            token = (d / "secrets" / "internal.token").read_text().strip()
            with grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
                md = [("authorization", f"Bearer {token}")]
                for b in sizes:
                    req = embedding_pb2.EmbedRequest(items=[embedding_pb2.EmbedItem(image=x) for x in data[:b]])
                    out[b] = _median_ms(lambda req=req: stub.Embed(req, metadata=md, timeout=120), repeats)
        finally:
            mesh.down(d, log=lambda m: None)
    return out


def run(sizes: list[int], repeats: int, out: Path | None) -> dict:
    from visearch.datasets import grocery_root, grocery_split
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    repo = Path(os.environ.get("VISEARCH_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)
    photos = [p.path for p in grocery_split(grocery_root(), "val") if p.is_product][:: 8][:max(sizes)]
    curves = raw_curve(repo, photos, sizes, repeats)
    curves["embedding service"] = service_curve(photos, sizes, repeats)
    table = {name: {b: {"ms": round(ms, 1), "images_per_s": round(1000 * b / ms, 1)} for b, ms in c.items()}
             for name, c in curves.items()}
    result = {"sizes": sizes, "repeats": repeats, "curves": table}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "result.md").write_text(markdown(result))
        plot(result, out / "curve.png")
    return result


def markdown(r: dict) -> str:
    names = list(r["curves"])
    lines = ["| batch | " + " | ".join(f"{n} ms | {n} img/s" for n in names) + " |",
             "|---:" * (1 + 2 * len(names)) + "|"]
    for b in r["sizes"]:
        cells = []
        for n in names:
            c = r["curves"][n][b]
            cells += [str(c["ms"]), str(c["images_per_s"])]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in r["curves"].items():
        bs = sorted(c)
        ax.plot(bs, [c[b]["images_per_s"] for b in bs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (one thread)")
    ax.set_title("Batching curve, 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/batching"))
    args = ap.parse_args(argv)
    print(markdown(run([int(s) for s in args.sizes.split(",")], args.repeats, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
