"""Region descriptors, query-adaptive matching and query expansion (visearch.regions), by hand and by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from visearch import regions


def test_ospp_is_an_overlapping_pyramid():
    cells = regions.ospp_cells(10, 10, levels=3)
    assert cells[0] == (0, 0, 10, 10)  # level 1: the whole map
    level2 = [c for c in cells if c[2] - c[0] == 7]  # 2/(2+1) of 10 -> 7
    assert sorted(level2) == [(0, 0, 7, 7), (0, 3, 7, 10), (3, 0, 10, 7), (3, 3, 10, 10)]
    level3 = [c for c in cells if c[2] - c[0] == 5]
    assert len(level3) == 9 and (0, 0, 5, 5) in level3 and (5, 5, 10, 10) in level3 and (2, 2, 7, 7) in level3
    assert len(cells) == 14
    assert all(0 <= r0 < r1 <= 10 and 0 <= c0 < c1 <= 10 for r0, c0, r1, c1 in cells)
    assert regions.ospp_cells(1, 1, 3) == [(0, 0, 1, 1)]  # a 1x1 map has one region


def test_fmp_finds_where_channels_fire():
    act = np.zeros((10, 10, 4), np.float32)
    act[1:4, 6:9, 0] = 5.0  # a strong detector top right
    act[6:9, 1:3, 1] = 2.0  # a weaker one bottom left
    act[:, :, 2] = 0.01  # a channel active everywhere: the whole map, not a region
    cells = regions.fmp_cells(act, n=8)
    assert cells[0] == (1, 6, 4, 9) and cells[1] == (6, 1, 9, 3) and len(cells) == 2


def test_pool_cells_sums_and_normalises_boxes():
    rng = np.random.default_rng(0)
    cells = rng.random((4, 6, 3)).astype(np.float32)
    boxes, feats = regions.pool_cells(cells, [(0, 0, 4, 6), (1, 2, 3, 5)])
    np.testing.assert_allclose(feats[0], cells.sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(feats[1], cells[1:3, 2:5].sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(boxes[1], [2 / 6, 1 / 4, 5 / 6, 3 / 4])


def test_nnls_matches_the_kkt_conditions():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=50)
    x = regions.nnls(a, b)
    grad = a.T @ (b - a @ x)
    assert (x >= 0).all()
    assert np.abs(grad[x > 0]).max() < 1e-8  # stationary on the free variables
    assert grad[x == 0].max() < 1e-8  # no descent direction into the bound ones
    x_free = np.linalg.lstsq(a, b, rcond=None)[0]
    if (x_free >= 0).all():
        np.testing.assert_allclose(x, x_free, atol=1e-8)


def test_qam_beats_every_union_of_regions():
    """The relaxed optimum is at least the best binary merge (checked exhaustively) and the best single region."""
    rng = np.random.default_rng(2)
    for _ in range(10):
        feats = np.abs(rng.normal(size=(6, 16))).astype(np.float32)
        q = np.abs(rng.normal(size=16)).astype(np.float32)
        score, z = regions.qam(q, feats)
        best_union = max(
            float(q @ feats[list(s)].sum(0) / (np.linalg.norm(q) * np.linalg.norm(feats[list(s)].sum(0))))
            for r in range(1, 7) for s in itertools.combinations(range(6), r))
        single, _ = regions.max_region(q, feats)
        assert score >= best_union - 1e-6 >= single - 1e-5
        assert (z >= 0).all() and score <= 1 + 1e-6


def test_qam_finds_the_object_in_clutter():
    """A query equal to the object's feature, the object split over two base regions among clutter:
    merging those two recovers a perfect match that no single region has."""
    rng = np.random.default_rng(3)
    obj_a, obj_b = np.abs(rng.normal(size=32)), np.abs(rng.normal(size=32))
    clutter = np.abs(rng.normal(size=(4, 32)))
    feats = np.vstack([clutter[:2], obj_a, obj_b, clutter[2:]])
    boxes = np.array([[0, 0, .3, .3], [.7, .7, 1, 1], [.4, .4, .5, .6], [.5, .4, .6, .6], [0, .7, .3, 1], [.7, 0, 1, .3]])
    score, z = regions.qam(obj_a + obj_b, feats)
    single, _ = regions.max_region(obj_a + obj_b, feats)
    assert score == pytest.approx(1.0, abs=1e-6) and single < 0.99
    np.testing.assert_allclose(regions.merged_box(boxes, z), [.4, .4, .6, .6])


def test_alpha_qe_and_dba():
    rng = np.random.default_rng(4)
    db = rng.normal(size=(20, 8))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[0] + 0.1 * rng.normal(size=8)
    q /= np.linalg.norm(q)
    scores = db @ q
    order = np.argsort(-scores)
    expanded = regions.alpha_qe(q, db[order], scores[order], k=1, alpha=1.0)
    want = q + scores[order][0] * db[order][0]
    np.testing.assert_allclose(expanded, want / np.linalg.norm(want), rtol=1e-6)
    aug = regions.dba(db, k=2)
    np.testing.assert_allclose(np.linalg.norm(aug, axis=1), 1.0, rtol=1e-6)
    assert (np.sum(aug * db, axis=1) > 0.5).all()  # each vector stays near itself
    np.testing.assert_allclose(regions.dba(db, k=0), db, rtol=1e-6)  # k=0: itself only
