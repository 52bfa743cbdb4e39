"""The classic baseline: dense SIFT (OpenCV) + k-means + VLAD + PCA-whitening, on real grocery photos."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("torch")

from visearch import datasets  # noqa: E402
from visearch.classic import DenseSIFT, SiftBank, SiftVLAD, root_sift  # noqa: E402

pytestmark = pytest.mark.train

GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")


def test_dense_grid_and_root_sift():
    d = DenseSIFT(side=64, step=8, patch=24)
    pts = d.grid()
    assert pts[0] == (12.0, 12.0) and pts[-1] == (52.0, 52.0) and d.n == 6 * 6
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 120, size=(5, 128)).astype(np.uint8)
    r = root_sift(raw)
    np.testing.assert_allclose((r * r).sum(1), 1.0, atol=1e-6)  # sqrt of an L1-normalised vector is L2-unit
    np.testing.assert_allclose(r[0], np.sqrt(raw[0] / raw[0].sum()), atol=1e-6)


def test_dense_sift_on_a_synthetic_edge():
    """A vertical step edge: descriptors near it are non-zero with their gradient energy in one
    orientation bin (horizontal gradient); descriptors far from it see a flat image: zero."""
    img = np.zeros((128, 128), np.uint8)
    img[:, 64:] = 200
    d = DenseSIFT(side=128, step=8, patch=24)
    desc = d.describe_gray(img)
    assert desc.shape == (d.n, 128) and desc.dtype == np.uint8
    xs = np.array([x for x, _ in d.grid()])
    near, far = np.abs(xs - 64) <= 4, np.abs(xs - 64) >= 40
    assert (desc[near].sum(1) > 0).all()
    assert (desc[far].sum(1) == 0).all()
    per_orientation = desc[near].reshape(-1, 16, 8).sum((0, 1))
    assert per_orientation.argmax() in (0, 4) and per_orientation.max() > 0.8 * per_orientation.sum()


@needs_grocery
def test_sift_vlad_on_real_photos(tmp_path):
    train = datasets.grocery_split(GROCERY, "train")
    fit = [p for fid in range(28, 32) for p in [q for q in train if q.fine_id == fid][:4]]
    held = [p for fid in range(28, 32) for p in [q for q in train if q.fine_id == fid][-2:]]
    dsift = DenseSIFT(side=160, step=8, patch=24)  # a smaller image keeps the test fast
    bank = SiftBank(dsift, cache=tmp_path)
    paths = [p.path for p in fit + held]
    bank.prepare(paths)
    assert list((tmp_path / "sift").glob("*/sift.npy"))  # cached on disk, uint8
    again = SiftBank(dsift, cache=tmp_path)
    np.testing.assert_array_equal(again.get(paths[:3]), bank.get(paths[:3]))

    model = SiftVLAD(k=8, wdim=12, wpower=0.5).fit(bank.get([p.path for p in fit]))
    emb = model.embed(bank.get([p.path for p in held]))
    assert emb.shape == (len(held), 12) and model.dim == 12
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    raw = model.vlads(bank.get([p.path for p in held]))
    assert raw.shape == (len(held), 8 * 128)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    # the same photo twice gives the same descriptor; same-product photos are closer than others
    sims = raw @ raw.T
    fid = np.array([p.fine_id for p in held])
    same = (fid[:, None] == fid[None]) & ~np.eye(len(fid), dtype=bool)
    assert sims[same].mean() > sims[fid[:, None] != fid[None]].mean()
