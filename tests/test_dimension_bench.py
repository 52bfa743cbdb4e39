"""bench/dimension.py: the PCA it fits, and a smoke run that builds the projection into the served graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_pca_projection_and_whitening():
    from visearch.modeling.reduce import fit_pca, project

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 12)) * np.linspace(5, 0.5, 12)) @ np.linalg.qr(rng.standard_normal((12, 12)))[0]
    x = x.astype(np.float32) + 3.0
    w, b = fit_pca(x, 12, 0.0)  # all directions, no whitening: a rotation of the centred data
    y = x @ w + b
    c = x - x.mean(0)
    assert np.allclose(y @ y.T, c @ c.T, atol=1e-2 * np.abs(c @ c.T).max())
    assert np.all(np.diff(y.var(0)) <= 1e-4)  # directions by decreasing variance
    w1, b1 = fit_pca(x, 4, 1.0)  # top 4, whitened: unit variance, uncorrelated
    z = x @ w1 + b1
    assert z.shape == (500, 4) and np.allclose(np.cov(z, rowvar=False), np.eye(4), atol=0.01)
    assert np.allclose(np.linalg.norm(project(x, w1, b1), axis=1), 1.0, atol=1e-5)


def test_dimension_benchmark_builds_the_projection_into_the_graph(tmp_path, model_repo):
    import onnxruntime as ort

    from bench.dimension import main
    from visearch.datasets import grocery_root, grocery_split
    from visearch.evaluation.runner import onnx_model_path
    from visearch.offline import load_batch

    assert main(["--model", str(model_repo), "--limit", "3", "--dims", "256,16", "--powers", "0,0.5",
                 "--export", "16", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert [v["label"] for v in r["variants"]] == ["served", "pca 256", "pca 256 w0.5", "pca 16", "pca 16 w0.5"]
    assert all(0 <= v[p]["mAP"] <= 1 for v in r["variants"] for p in ("P1", "P3", "TH"))
    e = r["export"]
    assert e["parity_max_abs_diff"] < 1e-4 and set(e["as_served"]) == {"P1", "P3"}
    meta = json.loads((tmp_path / "pca-16" / "meta.json").read_text())
    assert meta["dim"] == 16 and meta["pca"]["dim"] == 16 and meta["id"].endswith("-pca16")

    # The new graph: 16-d unit descriptors, the same region outputs as the served model.
    src, served_meta = onnx_model_path(model_repo)
    if "reduction" in served_meta:  # the bench reduces the full-dimension source of a reduced version
        src, served_meta = onnx_model_path(model_repo / "embedder" / str(served_meta["reduction"]["source_version"]))
    assert r["model"] == str(src)
    val = grocery_split(grocery_root(), "val")
    x = load_batch([p.path for p in val[:3]], served_meta["input_size"])
    old = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(e["path"], providers=["CPUExecutionProvider"])
    names = [o.name for o in old.get_outputs()]
    assert names == [o.name for o in new.get_outputs()]
    a = dict(zip(names, old.run(None, {old.get_inputs()[0].name: x}), strict=True))
    b = dict(zip(names, new.run(None, {new.get_inputs()[0].name: x}), strict=True))
    assert b["embeddings"].shape == (3, 16) and np.allclose(np.linalg.norm(b["embeddings"], axis=1), 1, atol=1e-5)
    assert not np.allclose(b["embeddings"], a["embeddings"][:, :16])
    for name in names[1:]:
        assert np.array_equal(a[name], b[name]), name


def test_pca_fit_benchmark_scores_each_fit_set(tmp_path, model_repo):
    """bench/pca_fit.py smoke run: each fit set's PCA scored on the selection and reported protocols.
    The stamps folder here is scikit-image's photos as transparent PNGs (the bench flattens them)."""
    import skimage.data
    from PIL import Image

    from bench.pca_fit import main

    stamps = tmp_path / "stamps"
    stamps.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "tiny"):
        img = np.zeros((8, 40, 3), np.uint8) if name == "tiny" else getattr(skimage.data, name)()
        rgba = Image.fromarray(img).convert("RGBA")
        rgba.putalpha(Image.new("L", rgba.size, 200))
        rgba.save(stamps / f"{name}.png")
    out = tmp_path / "out"
    assert main(["--model", str(model_repo), "--dim", "8", "--limit", "3", "--stamps", str(stamps), "--out", str(out)]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["stamps"] == 4, "the 8 px high stamp is left out"
    rows = {v["fit"]: v for v in r["variants"]}
    assert set(rows) == {"none", "grocery", "grocery+stamps"} and rows["grocery"]["dim"] == 8
    assert rows["grocery+stamps"]["fit_photos"] == rows["grocery"]["fit_photos"] + 4
    assert all(0 <= v[p]["mAP"] <= 1 for v in r["variants"] for p in ("TH", "GS", "P1", "P3", "G"))
    assert "| grocery+stamps | 8 |" in (out / "result.md").read_text()
    assert main(["--model", str(model_repo), "--stamps", str(tmp_path / "none"), "--out", str(out)]) == 1
