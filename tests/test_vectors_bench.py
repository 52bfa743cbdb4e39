"""bench/vectors.py: the exact top 10 it scores against, and a small run on Milvus Lite."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_chunked_exact_top10_matches_a_full_sort():
    from bench.vectors import chunk, merge_top

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((7, 16)).astype(np.float32)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    parts = [chunk(0, i, 40, 16, centres, 1.0) for i in range(3)]
    assert np.array_equal(parts[1], chunk(0, 1, 40, 16, centres, 1.0))  # regenerated alike
    s, ids = np.full((5, 10), -np.inf, np.float32), np.zeros((5, 10), np.int64)
    for i, x in enumerate(parts):
        s, ids = merge_top(s, ids, q @ x.T, 40 * i, 10)
    full = q @ np.concatenate(parts).T
    assert np.array_equal(np.sort(ids, 1), np.sort(np.argsort(-full, 1)[:, :10], 1))


@pytest.mark.integration  # starts Milvus Lite
def test_vectors_benchmark_smoke_on_milvus_lite(tmp_path):
    from bench.vectors import main

    assert main(["--n", "3000", "--dim", "32", "--queries", "20", "--chunk", "1000", "--ef", "64",
                 "--clusters", "30", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["n"] == 3000 and r["engine"] == "Milvus Lite"
    (row,) = r["by_ef"]
    assert row["recall@10"] >= 0.9 and 0 < row["p50_ms"] <= row["p99_ms"], row


def test_index_kinds_build_and_search_params():
    from bench.vectors import index_params, search_settings

    assert index_params("hnsw", 10**6) == ("HNSW", {"M": 16, "efConstruction": 200})
    assert index_params("ivf_sq8", 10**6) == ("IVF_SQ8", {"nlist": 4096})  # 4 sqrt(n), a power of two
    assert index_params("ivf_sq8", 10**4)[1] == {"nlist": 512}
    assert index_params("ivf_sq8", 10**6, 1024)[1] == {"nlist": 1024}  # the store's catalogs (--nlist)
    assert index_params("diskann", 10**6) == ("DISKANN", {})
    with pytest.raises(ValueError):
        index_params("flat", 10)
    assert [(k, v) for k, v, _ in search_settings("hnsw", [64])] == [("ef", 64)]
    assert [v for _, v, _ in search_settings("ivf_sq8")] == [16, 32, 64]
    (_, _, p), *_ = search_settings("diskann")
    assert p == {"metric_type": "IP", "params": {"search_list": 32}}


def test_rss_of_a_process_tree_from_proc(tmp_path):
    from bench.vectors import rss_tree_mb

    for pid, ppid, kb in ((10, 1, 1024), (11, 10, 2048), (12, 11, 512), (20, 1, 9999)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (mil vus) S {ppid} 0 0\n")
        (d / "status").write_text(f"Name:\tx\nVmRSS:\t    {kb} kB\n")
    (tmp_path / "self").mkdir()
    assert rss_tree_mb(10, tmp_path) == 3.5  # 10 + its child 11 + grandchild 12, not 20
    assert rss_tree_mb(12, tmp_path) == 0.5


@pytest.mark.integration  # the served embedder and Milvus Lite
def test_real_descriptors_are_made_and_searched(tmp_path):
    """bench.real_vectors embeds made-up views of grocery photos with the served model; bench.vectors
    --vectors searches them, some rows held out as the queries and never inserted."""
    from bench.real_vectors import main as make
    from bench.vectors import main, split_real

    f = tmp_path / "real.npz"
    assert make(["--views", "6", "--limit", "12", "--out", str(f)]) == 0
    z = np.load(f)
    assert z["vectors"].shape[0] == 72 and np.allclose(np.linalg.norm(z["vectors"], axis=1), 1, atol=1e-5)
    assert np.array_equal(np.bincount(z["photo"]), [6] * 12)
    # Views of one photo are nearer each other than to the other photos' (they are one object).
    x, photo = z["vectors"], z["photo"]
    sims = x @ x.T
    same, other = photo[:, None] == photo[None, :], photo[:, None] != photo[None, :]
    np.fill_diagonal(same, False)
    assert sims[same].mean() > sims[other].mean() + 0.1
    db, q = split_real(f, 8)
    assert len(db) == 64 and len(q) == 8 and not (q[:, None, :] == db[None, :, :]).all(-1).any()
    assert main(["--vectors", str(f), "--queries", "8", "--chunk", "20", "--ef", "64", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["n"] == 64 and r["dim"] == z["vectors"].shape[1] and r["data"].startswith("real descriptors")
    (row,) = r["by_ef"]
    assert row["recall@10"] >= 0.9, row
