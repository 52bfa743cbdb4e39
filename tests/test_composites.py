"""Composite detection scenes and box AP: exact boxes of pasted objects, hand-computed AP values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visearch import composites
from visearch.composites import Placement, average_precision, box_iou, build_composites, iconic_mask, make_composite
from visearch.datasets import grocery_iconic

# --- box IoU and AP ----------------------------------------------------------------------------


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 6]])
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [3, 3, 3, 3]])
    expected = np.array([[1.0, 25 / 175, 0.0, 0.0],
                         [0.6, 5 / 155, 0.0, 0.0]])  # 60 / 100; 5x1 over 60 + 100 - 5; an empty box overlaps nothing
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def det(*rows):
    """Detections of one image from [x1, y1, x2, y2, score] rows."""
    a = np.array(rows, dtype=float).reshape(-1, 5)
    return a[:, :4], a[:, 4]


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]
FAR = [100, 100, 110, 110]


def test_perfect_detections_give_one():
    assert average_precision([det(A + [0.9], B + [0.8]), det(C + [0.7])], [np.array([A, B]), np.array([C])]) == 1.0


def test_false_positive_ranked_first_costs_its_precision():
    # One truth, FP then TP: the TP is found at precision 1/2 -> AP 0.5.
    assert average_precision([det(FAR + [0.9], A + [0.8])], [np.array([A])]) == pytest.approx(0.5)
    # Two truths, FP then two TPs: precisions 1/2, 2/3; the envelope lifts the first to 2/3 -> AP 2/3.
    assert average_precision([det(FAR + [0.9], A + [0.8], B + [0.7])], [np.array([A, B])]) == pytest.approx(2 / 3)
    # Ranked last, after full recall, a false positive costs nothing.
    assert average_precision([det(A + [0.9], B + [0.8], FAR + [0.1])], [np.array([A, B])]) == 1.0


def test_missed_truth_caps_recall():
    # Two truths, only one found (at precision 1): recall stops at 1/2 -> AP 0.5.
    assert average_precision([det(A + [0.9]), det()], [np.array([A]), np.array([B])]) == pytest.approx(0.5)
    assert average_precision([det(), det()], [np.array([A]), np.array([B])]) == 0.0


def test_duplicates_are_false_positives():
    # Image 0: A twice (0.9 TP, 0.8 duplicate FP); image 1: B at 0.7 TP. Precisions 1, 1/2, 2/3 at
    # recalls 1/2, 1/2, 1: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    dets = [det(A + [0.9], A + [0.8]), det(B + [0.7])]
    assert average_precision(dets, [np.array([A]), np.array([B])]) == pytest.approx(5 / 6)


def test_ranking_is_over_the_whole_data_set():
    # The FP of image 1 (0.95) outranks the TP of image 0 (0.9): precisions 0, 1/2, 2/3 -> AP 2/3.
    dets = [det(A + [0.9]), det(FAR + [0.95], B + [0.5])]
    assert average_precision(dets, [np.array([A]), np.array([B])]) == pytest.approx(2 / 3)


def test_iou_threshold_is_respected():
    half = [0, 0, 10, 6]  # IoU 0.6 with A
    assert average_precision([det(half + [0.9])], [np.array([A])], iou=0.5) == 1.0
    assert average_precision([det(half + [0.9])], [np.array([A])], iou=0.6) == 1.0
    assert average_precision([det(half + [0.9])], [np.array([A])], iou=0.7) == 0.0


def test_each_detection_takes_its_best_unmatched_truth():
    # Truths [0,0,10,10] and [0,0,10,8]. The first detection matches A (IoU 1); the second,
    # [0,0,10,9], overlaps A best (0.9) but A is taken, so it takes [0,0,10,8] (IoU 8/9).
    truth = np.array([A, [0, 0, 10, 8]])
    assert average_precision([det(A + [0.9], [0, 0, 10, 9, 0.8])], [truth], iou=0.85) == 1.0


def test_no_truths_is_nan():
    assert np.isnan(average_precision([det(A + [0.9])], [np.zeros((0, 4))]))


# --- iconic masks ------------------------------------------------------------------------------


def test_iconic_mask_on_real_studio_images(grocery):
    iconic = {p.fine_name: p for p in grocery_iconic(grocery["root"])}
    lemon = iconic_mask(Image.open(iconic["Lemon"].path))
    assert 0.10 < lemon.mean() < 0.95
    assert not lemon[0].any() and not lemon[-1].any() and not lemon[:, 0].any() and not lemon[:, -1].any()
    # A box-shaped carton touching the top and bottom edges, with white print: the print stays foreground.
    carton = iconic_mask(Image.open(iconic["Arla-Sour-Cream"].path))
    assert 0.10 < carton.mean() < 0.95 and carton[0].mean() < 0.5 and not carton[:, 0].any()
    ys, xs = np.nonzero(carton)
    assert carton[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.8


def test_iconic_mask_fills_holes_and_refuses_degenerate_masks():
    a = np.full((60, 60, 3), 255, np.uint8)
    a[10:50, 10:50] = 0
    a[20:40, 20:40] = 255  # a white hole, not connected to the border
    mask = iconic_mask(Image.fromarray(a))
    assert mask[10:50, 10:50].all() and mask.sum() == 40 * 40
    assert iconic_mask(Image.new("RGB", (60, 60), "white")).all()


# --- one composite -----------------------------------------------------------------------------


def solid(color, w=100, h=100) -> Image.Image:
    return Image.new("RGB", (w, h), color)


GRAY = solid((128, 128, 128), 200, 200)


def test_placed_objects_get_their_exact_boxes():
    scene, boxes = make_composite(np.random.default_rng(0), GRAY, [(solid("red"), None)], 200,
                                  placements=[Placement(30, 40, 50)])
    np.testing.assert_array_equal(boxes, [[30, 40, 80, 90]])
    a = np.asarray(scene)
    assert (a[40:90, 30:80] == (255, 0, 0)).all() and (a[:40] == 128).all() and (a[90:] == 128).all()


def test_mask_gives_the_tight_box_and_partly_outside_objects_are_clipped():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 10:30] = True  # a 20 x 40 object inside padding: scaled so its longer side is 80 -> 40 x 80
    _, boxes = make_composite(np.random.default_rng(0), GRAY, [(solid("red"), mask)], 200,
                              placements=[Placement(10, 20, 80)])
    np.testing.assert_array_equal(boxes, [[10, 20, 50, 100]])
    _, boxes = make_composite(np.random.default_rng(0), GRAY, [(solid("red"), None)], 200,
                              placements=[Placement(-10, 150, 100)])  # 10 % off the left, 50 % off the bottom
    np.testing.assert_array_equal(boxes, [[0, 150, 90, 200]])


def test_occlusion_recomputes_and_drops_boxes():
    objects = [(solid("red"), None), (solid("blue"), None)]
    # Blue hides the right half of red: red keeps 50 % (>= 40 %) and a box around what is left.
    scene, boxes = make_composite(np.random.default_rng(0), GRAY, objects, 300,
                                  placements=[Placement(50, 50, 100), Placement(100, 50, 100)])
    np.testing.assert_array_equal(boxes, [[50, 50, 100, 150], [100, 50, 200, 150]])
    assert (np.asarray(scene)[50:150, 100:200] == (0, 0, 255)).all()
    # Blue hides the bottom 70 % of red: red keeps 30 % and loses its box.
    _, boxes = make_composite(np.random.default_rng(0), GRAY, objects, 300,
                              placements=[Placement(50, 50, 100), Placement(50, 80, 100)])
    np.testing.assert_array_equal(boxes, [[50, 80, 150, 180]])


@pytest.fixture(scope="module")
def real_parts(grocery):
    val = grocery["val"]
    backgrounds = [Image.open(p.path).convert("RGB") for p in val if not p.is_product][:4]
    products = [Image.open(p.path).convert("RGB") for p in val if p.is_product][::20]
    iconic = grocery_iconic(grocery["root"])[40]
    cutout = Image.open(iconic.path).convert("RGB")
    return backgrounds, [(p, None) for p in products] + [(cutout, iconic_mask(cutout))]


def test_random_composites_paste_visible_objects_inside_the_frame(real_parts):
    backgrounds, objects = real_parts
    counts = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        picked = [objects[int(i)] for i in rng.choice(len(objects), int(rng.integers(1, 4)), replace=False)]
        bg = backgrounds[seed % len(backgrounds)]
        scene, boxes = make_composite(rng, bg, picked, 256)
        assert scene.size == (256, 256) and scene.mode == "RGB" and boxes.shape[1] == 4
        assert ((boxes >= 0) & (boxes <= 256)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        diff = np.abs(np.asarray(scene, np.int16) - np.asarray(bg.resize((256, 256), Image.BILINEAR), np.int16)).sum(2)
        for x1, y1, x2, y2 in boxes.astype(int):
            region = diff[y1:y2, x1:x2]
            assert region.mean() > 10  # something was pasted there
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()  # tight
        counts.append(len(boxes))
    assert max(counts) >= 2 and sum(counts) >= 12


def test_make_composite_is_deterministic_for_a_seed(real_parts):
    backgrounds, objects = real_parts
    one = make_composite(np.random.default_rng(7), backgrounds[0], objects[:3], 200)
    two = make_composite(np.random.default_rng(7), backgrounds[0], objects[:3], 200)
    other = make_composite(np.random.default_rng(8), backgrounds[0], objects[:3], 200)
    assert one[0].tobytes() == two[0].tobytes() and np.array_equal(one[1], two[1])
    assert one[0].tobytes() != other[0].tobytes()


# --- the data set ------------------------------------------------------------------------------


def test_build_composites_writes_once_and_reloads(grocery, tmp_path, monkeypatch):
    root = grocery["root"]
    built = build_composites(root, tmp_path / "a", "val", n=5, seed=3, size=200)
    files = sorted((tmp_path / "a").glob("*.jpg"))
    assert len(built) == 5 and [c.path for c in built] == files
    for c in built:
        assert Image.open(c.path).size == (200, 200) and 1 <= len(c.boxes) <= 3
        assert all(0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 200 for x1, y1, x2, y2 in c.boxes)
    manifest = json.loads((tmp_path / "a" / "composites.json").read_text())
    sources = [r["background"] for r in manifest["composites"]] + [o for r in manifest["composites"] for o in r["objects"]]
    assert all(s.startswith("val/") for s in sources)  # held aside: nothing from train, no iconic images
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although the manifest matches")

    with monkeypatch.context() as m:
        m.setattr(composites, "make_composite", no_rebuild)
        again = build_composites(root, tmp_path / "a", "val", n=5, seed=3, size=200)
    assert again == built and [f.stat().st_mtime_ns for f in files] == stamps
    # Deterministic: a fresh build elsewhere writes the same images.
    elsewhere = build_composites(root, tmp_path / "b", "val", n=5, seed=3, size=200)
    assert [c.boxes for c in elsewhere] == [c.boxes for c in built]
    assert all(x.path.read_bytes() == y.path.read_bytes() for x, y in zip(elsewhere, built, strict=True))
    # Another seed does not reuse the manifest.
    assert [c.boxes for c in build_composites(root, tmp_path / "a", "val", n=5, seed=4, size=200)] != [c.boxes for c in built]
