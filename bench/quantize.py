"""int8 quantisation of the served embedder: speed and accuracy side by side in one run.

    python -m bench.quantize [--model model_repository] [--calibration 64] [--out runs/quantize]

Makes an int8 copy of the served embedder with ONNX Runtime's static quantisation (QDQ,
per-channel int8 weights, uint8 activations calibrated by MinMax on --calibration grocery
*train* photos, never a query), then, on the same photos and the same single intra-op
thread, times both (ms per image at batch 1 and batch 32, best of 3 after a warm-up) and
scores both with the evaluation harness (`visearch eval --model`, protocols P1 and P3,
embedded exactly as served). Writes result.json, result.md and the int8 model.onnx (with
its meta.json, ready to be a version folder of model_repository/embedder) into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from visearch.models.record import ModelRecord
from visearch.offline import load_batch
from visearch.ortsession import ort_session

ROOT = Path(__file__).resolve().parents[1]


def quantize(src: Path, dst: Path, calibration: np.ndarray, input_name: str) -> Path:
    """Static QDQ int8 quantisation of src (a model.onnx) into dst/model.onnx, calibrated on `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    dst.mkdir(parents=True, exist_ok=True)
    pre = dst / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    out = dst / "model.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return out


def time_model(path: Path, x: np.ndarray, names: list[str] | None = None) -> dict:
    """ms per image at batch 1 and 32, one intra-op thread, best of 3 after a warm-up."""
    sess = ort_session(path, 1)
    inp = sess.get_inputs()[0].name
    out = {}
    for batch in (1, 32):
        xb = x[:batch]
        sess.run(names, {inp: xb})
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            reps = max(1, 32 // batch)
            for _ in range(reps):
                sess.run(names, {inp: xb})
            runs.append((time.perf_counter() - t) * 1000 / (reps * batch))
        out[f"batch{batch}_ms_per_image"] = round(min(runs), 2)
    return out


def run(model: Path, n_calibration: int, out: Path, progress=print, protocols=("P1", "P3"), limit: int = 0) -> dict:
    from visearch.datasets import grocery_root, grocery_split
    from visearch.evaluation import runner
    from visearch.evaluation.protocols import get_protocols
    from visearch.evaluation.runner import onnx_model_path

    src, meta = onnx_model_path(model)
    size = int(meta["input_size"])
    root = grocery_root()
    train = grocery_split(root, "train")
    calib = load_batch([p.path for p in train[:: max(1, len(train) // n_calibration)][:n_calibration]], size)
    progress(f"quantising {src} on {len(calib)} train photos")
    t = time.perf_counter()
    q_path = quantize(src, out / "int8", calib, meta.get("input_name") or "images")
    unsigned = ModelRecord.from_dict({k: v for k, v in dict(meta).items() if k != "model_sha256"}, str(src))
    unsigned.derive(id=f"{meta.get('id') or 'embedder'}-int8", quantization="static QDQ int8, per-channel, MinMax "
                    f"on {len(calib)} train photos").write(q_path.parent)
    quant_s = round(time.perf_counter() - t, 1)

    val = [p.path for p in grocery_split(root, "val") if p.is_product][:32]
    x = load_batch(val, size)
    speed = {"fp32": time_model(src, x), "int8": time_model(q_path, x)}
    progress(f"speed: {speed}")
    sets = get_protocols(root, list(protocols))
    if limit:
        sets = {n: p.limited(limit) for n, p in sets.items()}
    acc = {}
    for label, path in (("fp32", src.parent), ("int8", q_path.parent)):
        row = runner.run_onnx(path, sets, None, 1, progress=lambda m: None)
        acc[label] = {n: {k: round(v, 4) for k, v in r.items() if k in ("mAP", "recall@1", "recall@5")}
                      for n, r in row.results.items()}
        progress(f"{label}: {acc[label]}")
    result = {"model": str(src), "int8_model": str(q_path), "quantize_seconds": quant_s, "calibration_photos": len(calib),
              "size_mb": {"fp32": round(src.stat().st_size / 2**20, 1), "int8": round(q_path.stat().st_size / 2**20, 1)},
              "speed": speed, "accuracy": acc,
              "speedup_batch1": round(speed["fp32"]["batch1_ms_per_image"] / speed["int8"]["batch1_ms_per_image"], 2),
              "speedup_batch32": round(speed["fp32"]["batch32_ms_per_image"] / speed["int8"]["batch32_ms_per_image"], 2)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    protos = list(r["accuracy"]["fp32"])
    head = "| | MB | ms/img b1 | ms/img b32 | " + " | ".join(f"{p} mAP | {p} R@1" for p in protos) + " |"
    lines = [head, "|---" * (4 + 2 * len(protos)) + "|"]
    for label in ("fp32", "int8"):
        s, a = r["speed"][label], r["accuracy"][label]
        lines.append(f"| {label} | {r['size_mb'][label]} | {s['batch1_ms_per_image']} | {s['batch32_ms_per_image']} | "
                     + " | ".join(f"{a[p]['mAP']} | {a[p]['recall@1']}" for p in protos) + " |")
    lines += ["", f"int8 speed-up: {r['speedup_batch1']}x at batch 1, {r['speedup_batch32']}x at batch 32 "
              f"(one thread; calibrated on {r['calibration_photos']} train photos).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="Queries per protocol (0: all): for a smoke run.")
    ap.add_argument("--out", type=Path, default=Path("runs/quantize"))
    args = ap.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out / "int8", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(markdown(run(args.model, args.calibration, args.out, limit=args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
