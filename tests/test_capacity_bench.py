"""bench.capacity: the capacity arithmetic from the measured unit costs (docs/CAPACITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import capacity


def test_plan_is_the_unit_costs_times_the_counts():
    units = dict(capacity.UNITS)
    small, big = capacity.plan(10e6, units, 100), capacity.plan(1e9, units, 1000)
    for r in (small, big):
        assert abs(r["objects"] - r["photos"] * units["objects_per_photo"]) < 1
        gib = r["objects"] * units["memory_bytes_per_object"] / 1024 ** 3
        assert abs(r["vector_memory_gib_per_replica"] - gib) < 1e-6
        # each replica's nodes hold it within their usable RAM, and enough replicas answer the target rate
        assert r["nodes_per_replica"] * capacity.NODE_RAM_GIB * capacity.RAM_USABLE >= gib
        assert r["replicas"] >= capacity.REPLICAS and r["replicas"] * r["qps_per_replica"] >= r["target_qps"]
        assert r["query_nodes"] == r["replicas"] * r["nodes_per_replica"]
    assert big["nodes_per_replica"] > small["nodes_per_replica"] and big["ingest_core_hours"] == 100 * small["ingest_core_hours"]


def test_units_read_the_measured_hnsw_cost(tmp_path):
    res = {"n": 2_000_000, "by_index": [{"index_type": "HNSW", "by_setting": [{"ef": 64, "p50_ms": 3.0},
                                                                              {"ef": 128, "p50_ms": 6.0}]}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert capacity.units_from(tmp_path / "r.json")["search_core_ms_per_million"] == 3.0
    assert capacity.units_from(tmp_path / "missing.json") == capacity.UNITS
    out = subprocess.run([sys.executable, "-m", "bench.capacity", "--photos", "1e7", "--index-result",
                          str(tmp_path / "r.json"), "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["rows"][0]["photos"] == 1e7


def test_ivf_sq8_catalogs_hold_less_per_object_and_read_their_own_row(tmp_path):
    from visearch.settings import StoreSettings
    from visearch.store import index_bytes

    hnsw, ivf = capacity.units_from(None, "hnsw"), capacity.units_from(None, "ivf_sq8")
    # the index's bytes a row differ, the fields do not; the figures are the store's own pricing at 128-d
    s = StoreSettings(milvus_uri="unused")
    assert capacity.INDEX_UNITS["ivf_sq8"]["index_bytes"] == round(index_bytes("ivf_sq8", 128, s))
    assert capacity.INDEX_UNITS["hnsw"]["index_bytes"] == round(index_bytes("hnsw", 128, s))
    assert hnsw["memory_bytes_per_object"] - ivf["memory_bytes_per_object"] == 657 - 230
    big_h, big_i = capacity.plan(1e9, hnsw, 100), capacity.plan(1e9, ivf, 100)
    assert big_i["nodes_per_replica"] < big_h["nodes_per_replica"]
    res = {"n": 1_000_000, "by_index": [
        {"index_type": "HNSW", "by_setting": [{"ef": 128, "p50_ms": 6.0}]},
        {"index_type": "IVF_SQ8", "by_setting": [{"nprobe": 16, "p50_ms": 1.0}, {"nprobe": 32, "p50_ms": 2.0}]}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert capacity.units_from(tmp_path / "r.json", "ivf_sq8")["search_core_ms_per_million"] == 2.0
    assert capacity.units_from(tmp_path / "r.json", "hnsw")["search_core_ms_per_million"] == 6.0
