"""A model change does not break existing catalogs: each catalog is searched and extended with the
model version that made its vectors, new catalogs get the new default, and versions never mix."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from bench.reembed import rotated_embedder, versioned_repo
from tests.test_mesh import cli, jsonl

pytestmark = pytest.mark.mesh


def test_catalogs_keep_their_model_version_across_a_model_change(model_repo, grocery, tmp_path):
    repo = versioned_repo(model_repo, tmp_path / "repo")  # the served embedder as version 1
    src = repo / "embedder" / "1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(tmp_path / "data"), VISEARCH_MODEL_REPOSITORY=str(repo))
    photos = [p for p in grocery["train"] if p.is_product][::60][:10]
    query = next(p for p in grocery["val"] if p.fine_id == photos[0].fine_id).path
    manifest = tmp_path / "a.csv"
    manifest.write_text("item_id,path\n" + "".join(f"a{i},{p.path}\n" for i, p in enumerate(photos[:6])))
    more = tmp_path / "more.csv"
    more.write_text("item_id,path\n" + "".join(f"m{i},{p.path}\n" for i, p in enumerate(photos[6:])))

    def ingest(path, catalog):
        res = json.loads(cli(env, "ingest", "--manifest", str(path), "--catalog", catalog, "--wait", "--json").stdout)
        assert res["failed"] == 0, res

    def models():
        return {c["name"]: c["model"] for c in jsonl(cli(env, "catalogs").stdout)}

    cli(env, "up")
    try:
        ingest(manifest, "old")
        before = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json").stdout)[0]
        assert before["model"] == "embedder:1" and before["hits"]
    finally:
        cli(env, "down", check=False)

    (repo / "embedder" / "2").symlink_to(src.resolve())  # a new model version is deployed
    cli(env, "up")
    try:
        after = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json").stdout)[0]
        assert "error" not in after, after
        assert after["model"] == "embedder:1", "the old catalog is still searched with the version that made it"
        assert [h["item_id"] for h in after["hits"]] == [h["item_id"] for h in before["hits"]]
        ingest(more, "old")  # extending it embeds with its version too
        ingest(manifest, "new")  # a new catalog gets the new default
        assert models() == {"old": "embedder:1", "new": "embedder:2"}
        new = jsonl(cli(env, "search", str(query), "--catalog", "new", "--json").stdout)[0]
        assert new["model"] == "embedder:2" and new["hits"]
        assert {c["name"]: c["objects"] for c in jsonl(cli(env, "catalogs").stdout)}["old"] >= len(photos)
        # A version that is no longer deployed: a clear FAILED_PRECONDITION, not a mixed answer.
        (repo / "embedder" / "1").unlink()
        cli(env, "restart", "embedding")
        gone = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json", check=False).stdout)[0]
        assert gone["error"]["code"] == "FAILED_PRECONDITION" and "version 1" in gone["error"]["message"], gone
    finally:
        cli(env, "down", check=False)


def test_reembedding_switches_a_catalog_while_searches_continue(model_repo, grocery, tmp_path):
    """Blue/green: a catalog made by embedder:1 is re-embedded with embedder:2 through the queue while
    searches run, ingests and deletes land meanwhile; no search fails, every answer comes from one
    model (a catalog photo finds itself at cosine ~1, which a v1 vector against a v2 query never
    gives), and the old generation is dropped afterwards, carrying over a write that reached only it."""
    from visearch import mesh
    from visearch.client import GatewayClient
    from visearch.demo import item_id, write_manifest
    from visearch.inference import ModelMeta
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    repo = versioned_repo(model_repo, tmp_path / "repo")  # the served embedder as version 1
    src = repo / "embedder" / "1"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(repo), VISEARCH_INGEST_OBJECTS="full",
               VISEARCH_QUERY_OBJECTS="full", VISEARCH_RETIRE_AFTER_SECONDS="8", VISEARCH_INGEST_BATCH="8")
    photos = [p for p in grocery["train"] if p.is_product][::10][:64]
    assert len(photos) == 64
    base, late = photos[:60], photos[60:]
    cli(env, "up")
    try:
        res = json.loads(cli(env, "ingest", "--manifest", str(write_manifest(base, tmp_path / "base.csv")),
                             "--catalog", "shop", "--wait", "--json").stdout)
        assert res["failed"] == 0, res
        ids = [item_id(p) for p in base]
        state = mesh.load_state(data)
        client = GatewayClient(state["gateway"], key=mesh.read_admin_key(data), timeout=30)
        first = client.search(base[0].path.read_bytes(), catalog="shop", top_k=3, rerank="none")
        assert first.model.version == "1" and first.hits[0].item_id == ids[0] and first.hits[0].score > 0.99

        rotation = rotated_embedder(src, repo / "embedder" / "2", 2)  # a new model is deployed beside the old one
        cli(env, "restart", "embedding")

        # While a generation is being built (made here directly, so that this happens for certain,
        # not by timing), an ingest is written to both generations, each by its own model, with
        # one stamp; a delete reaches both.
        milvus = next(c["address"] for c in state["components"] if c["kind"] == "milvus")
        store = VectorStore(StoreSettings(milvus_uri=milvus))
        v1 = store.live("shop")
        v2 = store.create_generation("shop", ModelMeta(name="embedder", version="2", input_name="", output_name="",
                                                       input_size=320, dim=v1.dim))
        res = json.loads(cli(env, "ingest", "--manifest", str(write_manifest(late, tmp_path / "late.csv")),
                             "--catalog", "shop", "--wait", "--json").stdout)
        assert res["failed"] == 0, res
        late_ids = [item_id(p) for p in late]
        s1, s2 = store.item_stamps(v1), store.item_stamps(v2)
        assert set(s2) == set(late_ids) and all(s1[i] == s2[i] for i in late_ids), (s1, s2)
        a, b = store.get_vectors(v1, [f"{late_ids[0]}#0"]), store.get_vectors(v2, [f"{late_ids[0]}#0"])
        np.testing.assert_allclose(a[f"{late_ids[0]}#0"] @ rotation, b[f"{late_ids[0]}#0"], atol=1e-4)
        gone_id = ids[-1]
        store.upsert_items(v2, [(gone_id, [(b[f"{late_ids[0]}#0"], (0, 0, 1, 1))], {}, "", 1)])
        assert json.loads(cli(env, "delete", gone_id, "--catalog", "shop").stdout)["deleted"] == 1
        assert gone_id not in store.item_stamps(v1) and gone_id not in store.item_stamps(v2)

        answers: list[tuple[str, str, str, float]] = []  # (query's item, model version, top item, its score)
        errors: list[str] = []
        stop = threading.Event()
        queries = [(ids[i], p.path.read_bytes()) for i, p in enumerate(base[:12])]

        def search_loop():
            n = 0
            while not stop.is_set():
                want, image = queries[n % len(queries)]
                n += 1
                try:
                    r = client.search(image, catalog="shop", top_k=3)
                    answers.append((want, r.model.version, r.hits[0].item_id, r.hits[0].score))
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    errors.append(f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=search_loop, daemon=True)
        thread.start()
        time.sleep(1.0)
        job = json.loads(cli(env, "reembed", "--catalog", "shop", "--json").stdout)
        assert job["generation"] == 2 and job["model"] == "embedder:2", "the generation being built is resumed"
        again = json.loads(cli(env, "reembed", "--catalog", "shop", "--json").stdout)
        assert again["job_id"] == job["job_id"], "a second call while one runs joins it"
        done = json.loads(cli(env, "job", job["job_id"], "--wait").stdout)
        # A late write: a worker that resolved the catalog just before the switch stores an item in
        # generation 1 only. Retiring generation 1 carries it over, embedded by version 2.
        box = store.item_rows(v2, [late_ids[1]])[late_ids[1]][0].box
        old_vec = store.get_vectors(v1, [f"{late_ids[1]}#0"])[f"{late_ids[1]}#0"]
        store.upsert_items(v1, [("late-write", [(old_vec, box)], {}, str(late[1].path), time.time_ns())])
        time.sleep(1.0)
        stop.set()
        thread.join(30)
        assert (done["kind"], done["phase"], int(done["failed"])) == ("reembed", "switched", 0), done
        assert int(done["submitted"]) == int(done["done"]) == len(base) - 1 + len(late), done

        assert not errors, errors[:5]
        versions = [v for _, v, _, _ in answers]
        assert "1" in versions and versions[-1] == "2", versions
        assert versions == sorted(versions), "once switched, no search is answered by the old generation"
        # The default re-ranking (alpha-QE, reading vectors of the same generation) moves the self-match
        # a little below 1; a query of one model against vectors of the other scores ~0.
        wrong = [a for a in answers if a[0] != a[2] or a[3] <= 0.9]
        assert not wrong, f"{len(wrong)} of {len(answers)} answers did not find the query itself at cosine > 0.9: {wrong[:5]}"

        cat = {c["name"]: c for c in jsonl(cli(env, "catalogs").stdout)}["shop"]
        assert (cat["model"], cat["generation"], "building" in cat) == ("embedder:2", 2, False), cat
        after = client.search(late[0].path.read_bytes(), catalog="shop", top_k=3, rerank="none")
        assert after.model.version == "2" and after.hits[0].item_id == late_ids[0] and after.hits[0].score > 0.99
        assert gone_id not in {h.item_id for h in client.search(base[-1].path.read_bytes(), catalog="shop").hits}
        assert json.loads(cli(env, "get", ids[0], "--catalog", "shop").stdout)["modelVersion"] == "embedder:2"

        deadline = time.monotonic() + 60
        while [g.number for g in store.generations("shop")] != [2] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [g.number for g in store.generations("shop")] == [2], "the old generation is retired"
        assert len(store.item_stamps("shop")) == len(base) + len(late), "all items, the late write too"
        carried = store.get_vectors("shop", ["late-write#0", f"{late_ids[1]}#0"])
        np.testing.assert_allclose(carried["late-write#0"], carried[f"{late_ids[1]}#0"], atol=1e-4)
        store.close()
        client.close()
    finally:
        cli(env, "down", check=False)


def test_reembed_benchmark_smoke(tmp_path):
    """bench/reembed.py end to end on a small catalog: it switches, reports every phase and draws the timeline."""
    from bench.reembed import main

    assert main(["--items", "12", "--settle", "2", "--retire-after", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["phase"] == "switched" and result["versions_in_order"] == ["1", "2"], result
    assert result["phases"]["before"]["searches"] > 0 and result["phases"]["after"]["versions"] == ["2"], result
    assert (tmp_path / "reembed-timeline.png").stat().st_size > 10_000
