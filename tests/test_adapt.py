"""Catalog adaptation (visearch/adapting.py, services/worker/adapt.py, `visearch adapt`): the fit learns
what views of one object share, an adapted version serves its catalog only, and the job runs through
the queue and the blue/green re-embedding of a real mesh."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from visearch import adapting
from visearch.inference import read_meta
from visearch.models.record import ModelRecord
from visearch.models.repository import adapted_to, general_versions


def _recall_at_1(q: np.ndarray, db: np.ndarray) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ db.T, axis=1) == np.arange(len(q))))


def test_fit_learns_what_views_of_one_object_share():
    """Objects differ in a few directions; views of an object move it strongly along other ones (a
    nuisance subspace shared by every view). Plain cosine confuses objects; the adapted projection,
    fitted on the catalog and views it made up itself, finds each object's new photo again."""
    rng = np.random.default_rng(0)
    n, c = 400, 64
    signal = rng.normal(size=(c, 8))
    nuisance = rng.normal(size=(c, 16))
    objects = rng.normal(size=(n, 8)) @ signal.T + 5.0  # a shared mean, as CNN descriptors have

    def seen(k):  # the same objects, seen otherwise: a strong move in the nuisance directions
        return objects + 3 * rng.normal(size=(n, 16)) @ nuisance.T + 0.05 * rng.normal(size=(n, c))

    x, views, queries = objects, [seen(k) for k in range(4)], seen(9)
    w, b = adapting.fit(x, views, 16)
    assert w.shape == (c, 16) and b.shape == (16,) and w.dtype == np.float32
    raw = _recall_at_1(queries, x)
    adapted = _recall_at_1(queries @ w + b, x @ w + b)
    assert raw < 0.5 and adapted > 0.9, (raw, adapted)


def test_fit_refuses_what_it_cannot_fit():
    x = np.ones((5, 4))
    with pytest.raises(ValueError, match="at least one made-up view"):
        adapting.fit(x, [], 2)
    with pytest.raises(ValueError, match="outside 1..4"):
        adapting.fit(x, [x], 8)
    with pytest.raises(ValueError, match="shape"):
        adapting.fit(x, [x[:3]], 2)
    with pytest.raises(ValueError, match="2 or more objects"):
        adapting.fit(x[:1], [x[:1]], 2)


def _version(repo, n, **extra):
    d = repo / "embedder" / str(n)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"graph")
    ModelRecord.of(name="embedder", version=n, id=f"m{n}", architecture="a", input_name="images", input_size=8,
                   output_name="embeddings", dim=4, **extra).write(d)


def test_an_adapted_version_is_never_the_default(tmp_path):
    _version(tmp_path, 1)
    _version(tmp_path, 2, reduction={"source_version": 1, "dim": 4})
    _version(tmp_path, 3, adaptation={"catalog": "shop", "source_version": 1})
    assert general_versions(tmp_path / "embedder") == [1, 2]
    assert adapted_to(tmp_path / "embedder" / "3") == "shop" and adapted_to(tmp_path / "embedder" / "2") is None
    assert read_meta(tmp_path, "embedder").version == "2"
    assert read_meta(tmp_path, "embedder", "3").version == "3"  # served when asked for by its catalog
    record = ModelRecord.read(tmp_path / "embedder" / "3")
    assert adapting.base_version(record) == 1
    assert adapting.target_dim(ModelRecord.read(tmp_path / "embedder" / "2"), ModelRecord.read(tmp_path / "embedder" / "1")) == 4


@pytest.mark.mesh
def test_adapt_writes_a_catalog_version_and_switches_the_catalog(model_repo, grocery, tmp_path):
    """`visearch adapt --catalog shop --wait` on a real mesh: the job embeds made-up views through the
    embedding service, writes a version adapted to `shop` (checked against numpy in the worker), and
    re-embeds the catalog into it; searches of `shop` then use it, other catalogs and new ones keep the
    default, and the catalog's own photos still find themselves first."""
    from tests.test_mesh import cli, jsonl

    repo = tmp_path / "repo"
    for name in ("embedder", "detector"):
        (repo / name).mkdir(parents=True)
        shutil.copy(model_repo / name / "config.pbtxt", repo / name / "config.pbtxt")
        for v in (model_repo / name).iterdir():
            if v.name.isdigit():
                (repo / name / v.name).symlink_to(v.resolve())
    default = read_meta(repo, "embedder").version
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(tmp_path / "data"), VISEARCH_MODEL_REPOSITORY=str(repo))
    photos = [p for p in grocery["train"] if p.is_product][::90][:24]
    manifest = tmp_path / "shop.csv"
    manifest.write_text("item_id,path\n" + "".join(f"s{i},{p.path}\n" for i, p in enumerate(photos)))
    cli(env, "up")
    try:
        for catalog in ("shop", "other"):
            res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", catalog, "--wait",
                                 "--json").stdout)
            assert res["failed"] == 0, res
        refused = cli(env, "adapt", "--catalog", "shop", "--views", "99", check=False)
        assert refused.returncode != 0 and "INVALID_ARGUMENT" in refused.stderr and "views 99" in refused.stderr
        missing = cli(env, "adapt", "--catalog", "nowhere", check=False)
        assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr

        r = cli(env, "adapt", "--catalog", "shop", "--views", "2", "--wait", "--json")
        job = json.loads(r.stdout)["job"]
        assert job["phase"] == "switched" and job["kind"] == "adapt", job
        assert int(job["done"]) == len(photos) and int(job["failed"]) == 0, job

        models = {c["name"]: c["model"] for c in jsonl(cli(env, "catalogs").stdout)}
        adapted = models["shop"].rpartition(":")[2]
        assert models["other"] == f"embedder:{default}" and adapted != default, models
        record = ModelRecord.read(repo / "embedder" / adapted)
        assert record.adaptation["catalog"] == "shop" and record.adaptation["views"] == 2
        assert record.adaptation["objects"] >= len(photos) and record.parity_max_abs_diff < 1e-3
        # 128-d, or the catalog's own dimension when its model is a reduction (its vectors keep their size)
        served = ModelRecord.read(repo / "embedder" / default)
        assert record.dim == adapting.target_dim(served, ModelRecord.read(repo / "embedder" / str(adapting.base_version(served))))
        assert record.dim == (served.dim if served.reduction else 128)
        assert read_meta(repo, "embedder").version == default  # still the default for everyone else

        hits = jsonl(cli(env, "search", *(str(p.path) for p in photos[:4]), "--catalog", "shop", "--full-frame",
                         "--rerank", "none", "--json").stdout)
        for i, answer in enumerate(hits):
            assert answer["model"] == f"embedder:{adapted}", answer
            assert answer["hits"][0]["item_id"] == f"s{i}", answer
        res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", "fresh", "--wait",
                             "--json").stdout)
        assert res["failed"] == 0
        assert {c["name"]: c["model"] for c in jsonl(cli(env, "catalogs").stdout)}["fresh"] == f"embedder:{default}"
    finally:
        cli(env, "down", check=False)
