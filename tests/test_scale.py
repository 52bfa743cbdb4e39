"""Horizontal scale on one machine: replicas behind round-robin targets and several workers share the work."""

from __future__ import annotations

import json
import os

import pytest

from tests.test_mesh import cli, jsonl, metric, scrape, worker_metric
from visearch import mesh
from visearch.client import Client
from visearch.demo import write_manifest

pytestmark = pytest.mark.mesh


def test_replicas_and_workers_share_the_load(tmp_path, model_repo, grocery):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(tmp_path / "mesh"), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_INGEST_BATCH="4")
    cli(env, "up", "--replicas", "embedding=2", "--replicas", "gateway=2", "--workers", "2")
    try:
        state = mesh.load_state(tmp_path / "mesh")
        comps = {c["name"]: c for c in state["components"]}
        assert {"embedding", "embedding-2", "gateway", "gateway-2", "worker", "worker-2"} <= set(comps)
        assert state["gateway"].startswith("ipv4:") and state["gateway"].count(",") == 1
        photos = [p for p in grocery["train"] if p.is_product][:64]
        res = json.loads(cli(env, "ingest", "--manifest", str(write_manifest(photos, tmp_path / "m.csv")),
                             "--catalog", "scale", "--wait", "--json").stdout)
        assert res["ok"] == 64
        queries = [str(p.path) for p in grocery["val"] if p.is_product][:12]
        # One Search call after another over one channel to both gateways (the SDK's round robin);
        # `visearch search` with several photos sends them as one BatchSearch, to one gateway.
        with Client(state["gateway"], api_key=mesh.read_admin_key(tmp_path / "mesh"), timeout=60) as client:
            assert all(client.search(q, catalog="scale").hits for q in queries)
        batched = jsonl(cli(env, "search", *queries, "--catalog", "scale", "--json").stdout)
        assert all("hits" in o for o in batched)

        def calls(name, method):
            return metric(scrape(comps[name]["metrics"]), "visearch_rpc_seconds_count", method=method)

        embeds = [calls("embedding", "Embed"), calls("embedding-2", "Embed")]
        searches = [calls("gateway", "Search"), calls("gateway-2", "Search")]
        done = [worker_metric(comps[w], env, "visearch_ingested_items_total", outcome="done") for w in ("worker", "worker-2")]
        print("embed calls per replica", embeds, "searches per gateway", searches, "items per worker", done)
        assert all(e > 0 for e in embeds) and all(s > 0 for s in searches) and all(d > 0 for d in done)
        assert sum(done) == 64
    finally:
        cli(env, "down", check=False)
