"""The detector: the converted graph against the original, post-processing, the service, the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import channel
from visearch import detector as det
from visearch.detection.v1 import detection_pb2, detection_pb2_grpc


def test_box_iou_and_nms_by_hand():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], float)
    iou = det.box_iou(a, a)
    assert iou[0, 1] == pytest.approx(25 / 175) and iou[0, 2] == 0 and np.allclose(np.diag(iou), 1)
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # [3] wins, suppresses [0] (IoU 0.9) and [1] (IoU 0.74); [2] overlaps nothing.
    assert det.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert det.nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert det.nms(boxes, scores, 0.5, limit=1).tolist() == [3]
    # Per class: boxes of different classes never suppress each other.
    assert det.nms(boxes, scores, 0.5, groups=np.array([1, 2, 1, 1])).tolist() == [3, 1, 2]


@pytest.mark.parametrize("mode", det.RESIZE_MODES)
def test_boxes_map_back_to_original_pixels(mode):
    """A box drawn on a non-square image comes back at the same pixels through either resize."""
    img = Image.new("RGB", (640, 360), (200, 200, 200))
    x, frame = det.prepare(img, 300, mode)
    assert x.shape == (300, 300, 3) and x.dtype == np.uint8
    truth = (100.0, 50.0, 420.0, 300.0)
    # Where that box lands in the model input, as fractions of its side.
    u = [(truth[0] * frame.scale_x + frame.pad_x) / 300, (truth[1] * frame.scale_y + frame.pad_y) / 300,
         (truth[2] * frame.scale_x + frame.pad_x) / 300, (truth[3] * frame.scale_y + frame.pad_y) / 300]
    assert det.to_pixels(np.array(u), frame) == pytest.approx(truth, abs=1e-6)
    if mode == "letterbox":
        assert frame.scale_x == pytest.approx(frame.scale_y, rel=1e-2) and frame.pad_y > 0 and x[0, 0].tolist() == [128, 128, 128]
    # Out-of-frame boxes are clipped to the image.
    assert det.to_pixels(np.array([-0.2, -0.2, 1.3, 1.3]), frame) == (0.0, 0.0, 640.0, 360.0)


def test_postprocess_class_agnostic_and_per_class():
    frame = det.Frame(300, 600, 300, 0.5, 1.0)
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], np.float32)
    scores = np.array([[0, 0.9, 0.1], [0, 0.2, 0.8], [0, 0.05, 0.1]], np.float32)
    labels = ["background", "cat", "dog"]
    agnostic = det.postprocess(boxes, scores, frame, labels, min_score=0.3, iou=0.5)
    assert [(b.label, round(b.score, 2)) for b in agnostic] == [("cat", 0.9)]
    assert agnostic[0].xyxy == pytest.approx((60.0, 30.0, 300.0, 150.0))
    per_class = det.postprocess(boxes, scores, frame, labels, min_score=0.3, iou=0.5, per_class=True)
    assert [(b.label, round(b.score, 2)) for b in per_class] == [("cat", 0.9), ("dog", 0.8)]
    assert det.postprocess(boxes, scores, frame, labels, min_score=0.95) == []
    # A box too small in original pixels is dropped before NMS, so it cannot take a slot of `limit`.
    tiny = np.array([[0.5, 0.5, 0.505, 0.505], [0.1, 0.1, 0.5, 0.5]], np.float32)
    found = det.postprocess(tiny, np.array([[0, 0.99], [0, 0.6]], np.float32), frame, ["bg", "object"], limit=1)
    assert [round(b.score, 2) for b in found] == [0.6]


def detector_version(model_repo, version="1"):
    path = model_repo / "detector" / version
    if not (path / "model.onnx").is_file():
        pytest.fail(f"{path} is not built: run `python -m visearch.modeling.detector_build`")
    return json.loads((path / "meta.json").read_text())


def test_converted_detector_matches_the_frozen_graph(model_repo, grocery):
    """The PyTorch re-build, exported to ONNX, finds what the original TF graph finds (run by cv2.dnn)."""
    from visearch.modeling import detector_build, ssd

    meta = detector_version(model_repo)
    assert meta["reference_parity"]["passed"] and meta["parity_max_abs_diff"] < 1e-3
    photos = [p.path for p in grocery["val"][5::37]][:6]
    report = detector_build.reference_parity(model_repo / "detector" / "1" / "model.onnx", photos)
    assert report["detections"] >= 5 and report["matched"] == report["detections"], report
    assert report["min_iou"] >= 0.9 and report["max_score_diff"] <= 0.02, report
    # The anchors the re-build decodes with are those of the graph's anchor generator (cv2's PriorBox).
    assert len(ssd.anchors()) == 1917 == meta["anchors"]


def test_detection_service(services, grocery, model_repo):
    detector_version(model_repo)
    services.env["VISEARCH_DETECTOR_VERSION"] = "1"  # the COCO conversion: it knows apples
    addr = services.start("detection")
    assert "model warmed up" in services.procs["detection"].log.read_text()
    apples = next(p for p in grocery["val"] if p.fine_name == "Golden-Delicious").path.read_bytes()
    img = Image.open(io.BytesIO(apples))
    w, h = img.size
    with channel(addr) as ch:
        stub = detection_pb2_grpc.DetectionServiceStub(ch)
        resp = stub.Detect(detection_pb2.DetectRequest(images=[apples]), timeout=20)
        res = resp.results[0]
        assert (res.width, res.height) == (w, h) and resp.model.startswith("detector:")
        assert res.detections, "the detector finds something in a photo of a crate of apples"
        scores = [d.score for d in res.detections]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.3
        for d in res.detections:
            assert 0 <= d.box.x1 < d.box.x2 <= w and 0 <= d.box.y1 < d.box.y2 <= h
        # Batching: the same image alone and in a batch gives the same boxes.
        both = stub.Detect(detection_pb2.DetectRequest(images=[apples, apples], max_detections=2), timeout=20)
        assert len(both.results) == 2 and len(both.results[1].detections) <= 2
        assert both.results[1].detections[0].box == res.detections[0].box
        # EXIF orientation: the same pixels stored sideways with an orientation tag give the same boxes.
        sideways = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW to display
        img.transpose(Image.Transpose.ROTATE_90).save(sideways, "PNG", exif=exif)
        upright = io.BytesIO()
        img.save(upright, "PNG")
        got = stub.Detect(detection_pb2.DetectRequest(images=[upright.getvalue(), sideways.getvalue()]), timeout=20)
        a, b = got.results
        assert (b.width, b.height) == (w, h)
        assert [d.box for d in a.detections] == [d.box for d in b.detections] and a.detections
        # A large JPEG decodes at a reduced scale: sizes and boxes still in its own pixels, where
        # the same photo at its own size puts them (x 8).
        big = io.BytesIO()
        img.resize((w * 8, h * 8), Image.BICUBIC).save(big, "JPEG", quality=95)
        small, large = stub.Detect(detection_pb2.DetectRequest(images=[apples, big.getvalue()]), timeout=30).results
        assert (large.width, large.height) == (8 * w, 8 * h) and large.detections
        a, b = small.detections[0].box, large.detections[0].box
        assert np.allclose([b.x1, b.y1, b.x2, b.y2], [8 * a.x1, 8 * a.y1, 8 * a.x2, 8 * a.y2], atol=0.03 * 8 * w)
        # Clear errors, and the service keeps serving.
        for request, words in ((detection_pb2.DetectRequest(images=[apples, apples[:500]]), "image 1"),
                               (detection_pb2.DetectRequest(), "no images"),
                               (detection_pb2.DetectRequest(images=[apples], min_score=1.5), "min_score"),
                               (detection_pb2.DetectRequest(images=[apples], max_detections=1000), "max_detections")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Detect(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert stub.Detect(detection_pb2.DetectRequest(images=[apples]), timeout=20).results[0].detections


def test_cli_detect_json(model_repo, grocery, tmp_path):
    photo = next(p for p in grocery["val"] if p.fine_name == "Golden-Delicious").path
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    env = {**os.environ, "VISEARCH_DETECTOR_VERSION": "1"}
    out = subprocess.run([sys.executable, "-m", "visearch.cli", "detect", "--json", "--repo", str(model_repo),
                          str(photo), str(bad)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(photo), str(bad)]
    w, h = Image.open(photo).size
    assert rows[0]["boxes"] and all(set(b) == {"box", "score", "label"} for b in rows[0]["boxes"])
    x1, y1, x2, y2 = rows[0]["boxes"][0]["box"]
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert "error" in rows[1] and "boxes" not in rows[1]
