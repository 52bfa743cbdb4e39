"""Made-up views (visearch.views): seeded, valid, and what the training cache and the generic protocols use."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visearch import datasets
from visearch.views import QUERY_VIEWS, TRAIN_VIEWS, ViewParams, made_up_view, seed_of

GROCERY = datasets.grocery_root()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    if GROCERY is None:
        pytest.skip("grocery dataset not found")
    path = datasets.grocery_split(GROCERY, "train")[0].path
    return Image.open(path).convert("RGB")


def test_a_seed_gives_the_same_pixels_and_another_seed_another_view(photo):
    a = np.asarray(made_up_view(photo, seed_of("x", 1)))
    b = np.asarray(made_up_view(photo, seed_of("x", 1)))
    c = np.asarray(made_up_view(photo, seed_of("x", 2)))
    assert a.shape == b.shape and np.array_equal(a, b)
    assert a.shape != c.shape or np.abs(a.astype(int) - c.astype(int)).mean() > 5
    assert seed_of("x", 1) == seed_of("x", "1") and seed_of("x", 1) != seed_of("x", 2)


def test_views_are_rgb_no_larger_than_the_photo_and_keep_some_of_it(photo):
    w, h = photo.size
    small = np.asarray(photo.resize((64, 64)), dtype=np.float32)
    for params in (TRAIN_VIEWS, QUERY_VIEWS):
        for i in range(12):
            v = made_up_view(photo, seed_of("check", i), params)
            assert v.mode == "RGB" and 8 <= v.size[0] <= w and 8 <= v.size[1] <= h
            # a made-up view is not noise: its colours stay those of the photo (mean within 60 grey levels)
            assert abs(np.asarray(v, dtype=np.float32).mean() - small.mean()) < 60


def test_no_change_asked_gives_the_photo_back(photo):
    none = ViewParams(crop_scale=(1.0, 1.0), crop_ratio=(w_h := photo.size[0] / photo.size[1], w_h), rotate_deg=0,
                      perspective=0, colour=0, blur_p=0, occlude_p=0, flip_p=0, min_side=1.0)
    assert np.array_equal(np.asarray(made_up_view(photo, 7, none)), np.asarray(photo))
