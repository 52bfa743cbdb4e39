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
