"""Objects, not images: a catalog photo of three things answers for each of them (detector in the mesh).

A small mesh of its own, pinned to the COCO detector (version 1, which knows fruit), with
the default ingestion policy: every detected object is stored as its own vector with its box.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import process_env
from tests.test_mesh import cli, jsonl
from visearch import composites
from visearch.detector import box_iou

pytestmark = pytest.mark.mesh
FRUIT = ("Banana", "Orange", "Red-Delicious")
PLACES = (composites.Placement(20, 150, 220), composites.Placement(230, 30, 220), composites.Placement(380, 300, 200))


@pytest.fixture(scope="module")
def objects_mesh(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("objects-mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo), VISEARCH_DETECTOR_VERSION="1",
               VISEARCH_INGEST_OBJECTS="detected", VISEARCH_QUERY_OBJECTS="best")
    cli(env, "up")
    yield env, data
    cli(env, "down", check=False)


def test_each_object_of_a_catalog_photo_is_found_with_its_box(objects_mesh, grocery, tmp_path):
    env, data = objects_mesh
    from visearch import datasets

    iconic = {p.fine_name: p for p in datasets.grocery_iconic(grocery["root"])}
    cutouts = []
    for name in FRUIT:
        im = Image.open(iconic[name].path).convert("RGB")
        cutouts.append((im, composites.iconic_mask(im)))
    shelf, boxes = composites.make_composite(np.random.default_rng(0), Image.new("RGB", (600, 600), (235, 232, 225)),
                                             cutouts, size=600, placements=PLACES, blur_probability=0)
    shelf.save(tmp_path / "shelf.png")
    # The catalog: the three-fruit photo, and single photos of other products as distractors.
    distractors = [p for p in grocery["train"] if p.is_product][::200][:8]
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("item_id,path\n" + f"shelf,{tmp_path / 'shelf.png'}\n"
                        + "".join(f"d{i},{p.path}\n" for i, p in enumerate(distractors)))
    res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", "objects", "--wait", "--json").stdout)
    assert res["ok"] == 1 + len(distractors) and res["failed"] == 0, res
    # The embedded mesh's Milvus Lite: a search's views in one call after its forwards (docs/VERIFY.md, stop 42).
    gateway = {c["name"]: c for c in json.loads(cli(env, "status", "--json").stdout)["components"]}["gateway"]
    assert process_env(gateway["pid"])["VISEARCH_EARLY_FULL_FRAME_SEARCH"] == "false"
    objects = {c["name"]: c["objects"] for c in jsonl(cli(env, "catalogs").stdout)}["objects"]
    assert objects >= 3 + len(distractors), "the shelf photo is stored as (at least) its three objects"
    # Each fruit's studio photo finds the shelf, and the hit's box is where that fruit is on the shelf.
    out = jsonl(cli(env, "search", *[str(iconic[n].path) for n in FRUIT], "--catalog", "objects", "--top-k", "3",
                    "--rerank", "none", "--json").stdout)
    for name, truth, o in zip(FRUIT, boxes, out, strict=True):
        top = o["hits"][0]
        assert top["item_id"] == "shelf", (name, o["hits"])
        assert box_iou(np.array([top["box"]]), np.array([truth]))[0, 0] >= 0.7, (name, top["box"], truth.tolist())
        w, h = Image.open(iconic[name].path).size
        qb = o["query_box"]
        assert (qb[2] - qb[0]) * (qb[3] - qb[1]) < 0.95 * w * h, "the query was cropped to the detected fruit"


def test_per_object_search_and_full_frame(objects_mesh, grocery, tmp_path):
    """A query photo of two fruit answers per object; --full-frame skips the crop."""
    env, _ = objects_mesh
    from visearch import datasets

    iconic = {p.fine_name: p for p in datasets.grocery_iconic(grocery["root"])}
    objs = []
    for name in ("Banana", "Red-Delicious"):
        im = Image.open(iconic[name].path).convert("RGB")
        objs.append((im, composites.iconic_mask(im)))
    query, boxes = composites.make_composite(np.random.default_rng(1), Image.new("RGB", (500, 400), (90, 90, 90)), objs,
                                             size=500, placements=(composites.Placement(10, 60, 220),
                                                                   composites.Placement(260, 200, 200)),
                                             blur_probability=0)
    query.save(tmp_path / "two.png")
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("item_id,path\n" + "".join(f"{n},{iconic[n].path}\n" for n in ("Banana", "Red-Delicious", "Orange",
                                                                                       "Lemon", "Pineapple")))
    res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", "fruit", "--wait", "--json").stdout)
    assert res["ok"] == 5, res
    out = jsonl(cli(env, "search", str(tmp_path / "two.png"), "--catalog", "fruit", "--top-k", "2", "--rerank", "none",
                    "--per-object", "--json").stdout)[0]
    assert len(out["objects"]) >= 2, out
    found = {}
    for o in out["objects"]:
        iou = box_iou(np.array([o["query_box"]]), boxes)[0]
        if iou.max() >= 0.7:
            found[("Banana", "Red-Delicious")[int(iou.argmax())]] = o["hits"][0]["item_id"]
    assert found == {"Banana": "Banana", "Red-Delicious": "Red-Delicious"}, out["objects"]
    full = jsonl(cli(env, "search", str(tmp_path / "two.png"), "--catalog", "fruit", "--full-frame", "--json").stdout)[0]
    assert full["query_box"] == [0.0, 0.0, 500.0, 500.0] and "objects" not in full
