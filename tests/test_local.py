"""Local features and geometric verification (visearch.local) on real photos, their compact form,
the fusion and match rule, and the file store that keeps them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from visearch import local
from visearch.imaging import decode_image
from visearch.localstore import LocalStore


@pytest.fixture(scope="module")
def photos(grocery):
    """Two photos of one product and one of another (grocery train split)."""
    by_class: dict[int, list] = {}
    for p in grocery["train"]:
        if p.is_product:
            by_class.setdefault(p.fine_id, []).append(p.path)
    a, b = sorted(by_class)[:2]
    return [np.asarray(decode_image(p.read_bytes())) for p in (by_class[a][0], by_class[a][1], by_class[b][0])]


def warp(img: np.ndarray, angle: float = 15.0, scale: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    return cv2.warpAffine(img, m, (w, h), borderValue=(255, 255, 255)), m


def test_the_packaged_projection_is_the_recorded_one():
    assert hashlib.sha256(local.PCA_FILE.read_bytes()).hexdigest() == local.PCA_SHA256
    mean, w = local.load_pca()
    assert mean.shape == (128,) and w.shape == (128, 32)
    np.testing.assert_allclose(w.T @ w, np.eye(32), atol=1e-4)  # orthonormal directions


def test_compact_form_round_trips_within_the_budget(photos):
    feats = local.RootSift()(photos[0])
    assert len(feats) > 200 and feats.desc.dtype == np.int8 and feats.desc.shape[1] == 32
    stored = feats.inside((0, 0, 1e9, 1e9), local.capacity("rootsift", 32))
    data = stored.to_bytes()
    assert len(data) <= local.BUDGET
    back = local.Features.from_bytes(data)
    assert back.kind == "rootsift" and np.array_equal(back.desc, stored.desc)
    assert np.abs(back.xy - stored.xy).max() <= 0.25, "half-pixel coordinates"
    orb = local.Orb()(photos[0]).inside((0, 0, 1e9, 1e9), local.capacity("orb", 32))
    assert len(orb.to_bytes()) <= local.BUDGET and np.array_equal(local.Features.from_bytes(orb.to_bytes()).desc, orb.desc)
    assert len(local.Features.from_bytes(local.Features("rootsift", np.zeros((0, 2)), np.zeros((0, 32), np.int8))
                                         .to_bytes())) == 0


def test_features_inside_a_box_keep_the_strongest():
    xy = np.array([[1, 1], [50, 50], [60, 60], [200, 200]], np.float32)
    f = local.Features("orb", xy, np.arange(4 * 32, dtype=np.uint8).reshape(4, 32))
    got = f.inside((40, 40, 100, 100), 1)
    assert got.xy.tolist() == [[50, 50]]


def test_tentative_matches_are_opencvs_mutual_ratio_matches(photos):
    # The served matcher (one matrix product, masked minimum for the second nearest) against
    # OpenCV's brute-force L2 matcher: nearest two, Lowe's ratio, kept when mutual.
    q = local.RootSift(max_side=local.QUERY_SIDE)(photos[1])
    cap = local.capacity("rootsift", 32)
    for other in (photos[0], photos[2]):
        c = local.RootSift()(other).inside((0, 0, 1e9, 1e9), cap)
        a, b = q.desc.astype(np.float32), c.desc.astype(np.float32)
        bf = cv2.BFMatcher(cv2.NORM_L2)
        back = {m.queryIdx: m.trainIdx for m in bf.match(b, a)}
        want = sorted((m.queryIdx, m.trainIdx) for m, n in bf.knnMatch(a, b, k=2)
                      if m.distance <= 0.9 * n.distance and back[m.trainIdx] == m.queryIdx)
        got = local.tentative(q, c, ratio=0.9)
        assert len(want) >= 10
        assert sorted(map(tuple, got.tolist())) == want


def test_tentative_matches_equal_the_partition_form_on_ties_and_tiny_sets():
    # Small integer descriptors force equal distances; two-feature candidates are the smallest matched.
    from bench.verify_cost import reference

    rng = np.random.default_rng(7)
    for n_q, n_c in ((2, 2), (5, 2), (40, 30), (200, 120)):
        for _ in range(20):
            q = local.Features("rootsift", np.zeros((n_q, 2), np.float32),
                               rng.integers(-2, 3, (n_q, 8)).astype(np.int8))
            c = local.Features("rootsift", np.zeros((n_c, 2), np.float32),
                               np.concatenate([q.desc[: n_c // 2], rng.integers(-2, 3, (n_c - n_c // 2, 8))]).astype(np.int8))
            assert np.array_equal(local.tentative(q, c), reference(q, c))


def test_verification_finds_the_transform_of_the_same_photo_and_not_another_product(photos):
    ext = local.RootSift()
    warped, m = warp(photos[0])
    q = ext(warped)
    same = ext(photos[0]).inside((0, 0, 1e9, 1e9), local.capacity("rootsift", 32))
    other = ext(photos[2]).inside((0, 0, 1e9, 1e9), local.capacity("rootsift", 32))
    v = local.verify(q, same)
    assert v.inliers >= 30, v.inliers
    # The inliers map query points to catalog points by the inverse of the warp (within pixels).
    inv = cv2.invertAffineTransform(m)
    mapped = (inv[:, :2] @ v.pairs[:, :2].T).T + inv[:, 2]
    assert np.median(np.linalg.norm(mapped - v.pairs[:, 2:], axis=1)) < 3.0
    assert v.hull_area > 0.2 * photos[0].shape[0] * photos[0].shape[1]
    assert local.verify(q, other).inliers < 12


def test_fusion_verifies_expands_and_decides_matches():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    query = vecs[3] + 0.3 * vecs[0]
    query /= np.linalg.norm(query)
    scores = vecs @ query
    order = np.argsort(-scores)
    vecs, scores = vecs[order], scores[order]
    pairs = np.zeros((40, 4), np.float32)
    strong = local.Verification(40, 50, pairs, hull_area=5000.0, query_hull_area=5000.0)
    logo = local.Verification(40, 50, pairs, hull_area=100.0, query_hull_area=100.0)  # many inliers on a small patch
    boxes = {i: (0, 0, 100, 100) for i in range(5)}
    params = local.VerifyParams(min_inliers=12, min_coverage=0.06, weight=0.5, cap=40, threshold=0.9, match_on="fused")
    r = local.fuse(query, vecs, scores, {4: strong, 1: logo}, boxes, 100 * 100, params)
    assert r.verified == {4}, "a small patch of inliers is not verification"
    assert r.order[0] == 4 and r.matched == {4}
    assert r.scores[0] == pytest.approx(float(vecs[4] @ (query + vecs[4]) / np.linalg.norm(query + vecs[4])) + 0.5,
                                        abs=1e-5), "spatially verified expansion, then the bonus"
    unsure = local.fuse(query, vecs, scores, {4: strong}, boxes, 100 * 100, local.VerifyParams(threshold=5.0))
    assert unsure.verified == {4} and unsure.matched == set(), "verified but under the threshold: no match"
    # The match decided on the candidate's own similarity (the default), not the expanded, fused one:
    # candidate 4 is last by similarity; 1 is higher but not verified.
    for t, matched in ((float(scores[4]) + 1e-3, set()), (float(scores[4]) - 1e-3, {4})):
        own = local.fuse(query, vecs, scores, {4: strong, 1: logo}, boxes, 100 * 100,
                         replace(params, match_on="similarity", threshold=t))
        assert own.order[0] == 4 and own.matched == matched
    evidence = replace(params, match_on="evidence", threshold=float(scores[4]) + 0.5 - 1e-3)
    assert local.fuse(query, vecs, scores, {4: strong}, boxes, 100 * 100, evidence).matched == {4}
    with pytest.raises(ValueError, match="unknown match score"):
        local.fuse(query, vecs, scores, {4: strong}, boxes, 100 * 100, replace(params, match_on="vibes"))
    none = local.fuse(query, vecs, scores, {}, boxes, 100 * 100, params)
    assert none.order.tolist() == list(range(5)) and not none.matched, "nothing verified: the global order"


def test_params_are_read_from_the_model_folder(tmp_path):
    assert local.VerifyParams.load(tmp_path / "missing.json") == local.VerifyParams()
    p = local.VerifyParams(top=10, threshold=0.8, selected_on="TH")
    p.write(tmp_path / "verify.json")
    assert local.VerifyParams.load(tmp_path / "verify.json") == p
    # A file written before the match rule was a choice holds a threshold on the fused score.
    (tmp_path / "old.json").write_text(json.dumps({"top": 20, "threshold": 0.9781}))
    assert local.VerifyParams.load(tmp_path / "old.json") == local.VerifyParams(threshold=0.9781, match_on="fused")


def test_local_store_keys_files_by_hashed_id(tmp_path):
    store = LocalStore(tmp_path)
    ids = ["a#0", "x' or object_id != '#1", "../../etc/passwd#0", "é" * 200 + "#2"]
    store.put_many("vsg_c_1", {i: i.encode() for i in ids})
    assert store.get_many("vsg_c_1", [*ids, "nope#0"]) == {i: i.encode() for i in ids}
    assert all(p.parent.parent == tmp_path / "vsg_c_1" for p in map(lambda i: store.path("vsg_c_1", i), ids))
    store.delete("vsg_c_1", ids[:1])
    assert set(store.get_many("vsg_c_1", ids)) == set(ids[1:]) and store.count("vsg_c_1") == 3
    store.drop("vsg_c_1")
    assert store.get_many("vsg_c_1", ids) == {} and not (tmp_path / "vsg_c_1").exists()
