"""The whole mesh as separate processes, driven through the `visearch` CLI like a user would.

Real Redis, a real Celery worker, Milvus Lite, ONNX Runtime with real weights.
Ingests the Grocery Store train split (2,640 real shop photos) through the queue
and measures photo -> photo retrieval with the val photos of packaged products.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.conftest import process_env
from visearch.demo import item_id, write_manifest
from visearch.metrics import retrieval_report

pytestmark = pytest.mark.mesh


def cli(env: dict, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "visearch.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"visearch {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mesh_env(tmp_path_factory, model_repo, grocery):
    data = tmp_path_factory.mktemp("mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    # Each photo stored as its full frame only: the whole train split at a third of the default's
    # cost (CI time). Detected objects at ingestion: tests/test_objects_mesh.py, tests/test_reliability.py.
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo), VISEARCH_INGEST_OBJECTS="full")
    # Searches as a deployment on a Milvus server does: the full frame's rows asked for while the box's
    # forward runs (the embedded mesh's default is one call after both; tests/test_objects_mesh.py), so
    # the parity check below covers that path over gRPC.
    env["VISEARCH_EARLY_FULL_FRAME_SEARCH"] = "true"
    cli(env, "up", "--ingest-root", str(grocery["root"]))
    yield env
    cli(env, "down", check=False)


@pytest.fixture(scope="module")
def catalog(grocery) -> list:
    """The module's catalog: every third train photo, each product with about 11 photos (CI time;
    the whole split's ingest throughput: bench/ingest.py, docs/PERFORMANCE.md)."""
    return grocery["train"][::3]


@pytest.fixture(scope="module")
def ingested(mesh_env, catalog, tmp_path_factory):
    manifest = write_manifest(catalog, tmp_path_factory.mktemp("manifest") / "train.csv")
    # Made with regions, which the region re-rank methods below need (new catalogs store none by default).
    r = cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "grocery", "--regions", "float", "--wait",
            "--json")
    return {"manifest": manifest, "result": json.loads(r.stdout)}


@pytest.fixture(scope="module")
def val_search(mesh_env, ingested, grocery, catalog) -> dict:
    """Every val photo of a product searched once with the defaults (CLI, JSON lines), and P1 on it."""
    queries = [p for p in grocery["val"] if p.is_product]
    out = jsonl(cli(mesh_env, "search", *[str(q.path) for q in queries], "--catalog", "grocery",
                    "--top-k", "100", "--json").stdout)
    by_class: dict[int, set[str]] = {}
    for p in catalog:
        by_class.setdefault(p.fine_id, set()).add(item_id(p))
    report = retrieval_report([[h["item_id"] for h in o["hits"]] for o in out], [by_class[q.fine_id] for q in queries])
    return {"queries": queries, "out": out, "report": report}


def test_status_lists_every_component_serving(mesh_env):
    st = json.loads(cli(mesh_env, "status", "--json").stdout)
    names = {c["name"]: c for c in st["components"]}
    assert set(names) == {"redis", "milvus", "detection", "embedding", "rerank", "gateway", "worker"}
    assert all(c["health"] == "SERVING" and c["pid"] > 0 and c["address"] for c in names.values()), names
    assert process_env(names["gateway"]["pid"])["VISEARCH_EARLY_FULL_FRAME_SEARCH"] == "true"  # as asked


def test_ingest_train_photos_through_the_queue(ingested, catalog):
    res = ingested["result"]
    assert res["ok"] == len(catalog) and res["failed"] == 0, res


def test_same_product_ranks_first(val_search):
    queries, out, report = val_search["queries"], val_search["out"], val_search["report"]
    assert [o["query"] for o in out] == [str(q.path) for q in queries]
    assert all("hits" in o and len(o["hits"]) == 100 for o in out)
    lat = sorted(o["latency_ms"] for o in out)
    print("mesh photo->photo:", json.dumps(report), "latency p50 ms:", lat[len(lat) // 2])
    # The bar: at least the off-the-shelf level of this backbone family (R@1 about 0.5).
    assert report["recall@1"] >= 0.5, report
    assert report["recall@10"] > report["recall@1"]


def test_the_mesh_scores_as_its_offline_harness(val_search, catalog, model_repo):
    """The mesh's default search path over gRPC (its query policy, re-rank method and the rows Milvus
    returns) and bench.meshpath, which runs the same decisions and models in-process on the same
    photos, score P1 (on this module's catalog) within 0.01 R@1 and mAP@20: the harness's numbers are
    the mesh's."""
    import asyncio

    from bench.meshpath import evaluate

    queries, out, mesh = val_search["queries"], val_search["out"], val_search["report"]
    # The mesh of this module stores full frames only (VISEARCH_INGEST_OBJECTS=full); the rest are defaults.
    offline = asyncio.run(evaluate("P1", model_repo, "full", 3, "both", out[0]["rerank"], queries, catalog))
    print("mesh", json.dumps(mesh), "offline", json.dumps(offline))
    assert abs(mesh["recall@1"] - offline["recall@1"]) <= 0.01 + 1e-9, (mesh, offline)
    assert abs(mesh["mAP@20"] - offline["mAP@20"]) <= 0.01, (mesh, offline)


def test_rerank_methods_over_the_mesh(mesh_env, ingested, grocery, catalog):
    """Every re-rank method through gateway -> rerank -> Milvus; region methods say where the match is."""
    from PIL import Image

    size = {item_id(p): Image.open(p.path).size for p in catalog}
    queries = [p for p in grocery["val"] if p.is_product][:3]
    for method in ("none", "qe", "regions", "qam", "verify"):
        out = jsonl(cli(mesh_env, "search", *[str(q.path) for q in queries], "--catalog", "grocery", "--top-k", "5",
                        "--rerank", method, "--json").stdout)
        for o in out:
            assert o["rerank"] == method and len(o["hits"]) == 5, o
            scores = [h["score"] for h in o["hits"]]
            assert scores == sorted(scores, reverse=True)
            assert all(isinstance(h["match"], bool) for h in o["hits"])
            if method == "verify":
                # Its own product's photos verify: the top hit has local features matched, and only a
                # verified hit can be a match.
                assert o["hits"][0].get("inliers", 0) > 0, o["hits"][0]
                assert all(h.get("inliers", 0) > 0 for h in o["hits"] if h["match"])
            else:
                assert not any(h["match"] for h in o["hits"])
            if method in ("regions", "qam"):
                for h in o["hits"]:
                    w, hh = size[h["item_id"]]
                    x1, y1, x2, y2 = h["region"]
                    assert 0 <= x1 < x2 <= w + 0.5 and 0 <= y1 < y2 <= hh + 0.5, (h, w, hh)
            else:
                assert not any("region" in h for h in o["hits"])
    default = jsonl(cli(mesh_env, "search", str(queries[0].path), "--catalog", "grocery", "--json").stdout)[0]
    assert default["rerank"] == "verify"  # the service default when it has a store


def test_reingest_is_idempotent(mesh_env, ingested, tmp_path):
    rows = list(csv.reader(open(ingested["manifest"])))
    subset = tmp_path / "again.csv"
    with open(subset, "w", newline="") as f:
        csv.writer(f).writerows(rows[:41])
    before = {c["name"]: c["objects"] for c in jsonl(cli(mesh_env, "catalogs").stdout)}["grocery"]
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(subset), "--catalog", "grocery", "--wait",
                         "--json").stdout)
    assert res["ok"] == 40
    after = {c["name"]: c["objects"] for c in jsonl(cli(mesh_env, "catalogs").stdout)}["grocery"]
    assert after == before


def test_catalog_storage_is_chosen_when_made_and_priced(mesh_env, ingested, grocery, model_repo, tmp_path):
    """A catalog made with the defaults stores no base regions: `catalogs --json` prices it at its
    vector, index links and fields in memory (local features besides), the region re-rank methods say
    why they cannot run on it, and it keeps its storage; the grocery catalog, made with
    `--regions float`, pays their 24 x 256 float32 per object."""
    photos = grocery["val"][:4]
    manifest = write_manifest(photos, tmp_path / "lean.csv")
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "lean", "--wait",
                         "--json").stdout)
    assert res["ok"] == len(photos)
    cats = {c["name"]: c for c in jsonl(cli(mesh_env, "catalogs", "--json").stdout)}
    lean, rich = cats["lean"], cats["grocery"]
    assert lean["regions"] == "off" and rich["regions"] == "float" and lean["objects"] == len(photos)
    vector = lean["dim"] * 4
    assert vector < lean["memory_bytes_per_object"] <= vector + 512, lean  # + HNSW links and fields
    assert lean["memory_bytes_per_object"] + 1000 < lean["bytes_per_object"] <= lean["memory_bytes_per_object"] + 8192
    assert rich["memory_bytes_per_object"] >= lean["memory_bytes_per_object"] + 24 * 256 * 4, (rich, lean)
    q = str(photos[0].path)
    for method in ("qam", "regions"):
        out = jsonl(cli(mesh_env, "search", q, "--catalog", "lean", "--rerank", method, "--json", check=False).stdout)
        assert out[0]["error"]["code"] == "FAILED_PRECONDITION" and "--regions float" in out[0]["error"]["message"]
    hits = jsonl(cli(mesh_env, "search", q, "--catalog", "lean", "--json").stdout)[0]["hits"]
    assert hits[0]["item_id"] == item_id(photos[0]) and hits[0]["match"]
    r = cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "lean", "--regions", "float", check=False)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "regions off" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # int8 regions: read by key from files, so the memory per object stays the lean catalog's.
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "compact", "--regions", "int8",
                         "--wait", "--json").stdout)
    assert res["ok"] == len(photos)
    compact = {c["name"]: c for c in jsonl(cli(mesh_env, "catalogs", "--json").stdout)}["compact"]
    assert compact["regions"] == "int8"
    assert abs(compact["memory_bytes_per_object"] - lean["memory_bytes_per_object"]) < 64, (compact, lean)
    assert compact["bytes_per_object"] > lean["bytes_per_object"] + 2000, (compact, lean)
    for method in ("qam", "regions"):
        hits = jsonl(cli(mesh_env, "search", q, "--catalog", "compact", "--rerank", method, "--json").stdout)[0]["hits"]
        assert hits[0]["item_id"] == item_id(photos[0]) and "region" in hits[0], (method, hits[0])
    # The vector index is chosen the same way: flat (exact) holds the vector without HNSW's links.
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "exact", "--index", "flat",
                         "--wait", "--json").stdout)
    assert res["ok"] == len(photos)
    cats = {c["name"]: c for c in jsonl(cli(mesh_env, "catalogs", "--json").stdout)}
    assert cats["exact"]["index"] == "flat" and lean["index"] == "hnsw" and cats["grocery"]["index"] == "hnsw"
    assert cats["exact"]["memory_bytes_per_object"] + 100 < lean["memory_bytes_per_object"], (cats["exact"], lean)
    hits = jsonl(cli(mesh_env, "search", q, "--catalog", "exact", "--json").stdout)[0]["hits"]
    assert hits[0]["item_id"] == item_id(photos[0])
    r = cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "exact", "--index", "hnsw", check=False)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "index flat" in r.stderr, r.stderr


def test_similar_searches_with_a_stored_item(mesh_env, ingested, catalog):
    """"More like this": a catalog item is the query by its id. Its stored vector and local features
    find the other photos of its product; the item itself is never a hit; nothing is embedded again
    (the embedding service's RPC count does not move); an unknown item or an impossible request says why."""
    from visearch.mesh import load_state

    comps = {c["name"]: c for c in load_state(Path(mesh_env["VISEARCH_DATA_DIR"]))["components"]}
    product = {item_id(p): p.fine_id for p in catalog}
    items = [item_id(p) for p in catalog[::97][:6]]
    before = metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="Embed")
    right = 0
    for it in items:
        out = json.loads(cli(mesh_env, "similar", it, "--catalog", "grocery", "--top-k", "5", "--json").stdout)
        assert out["item_id"] == it and len(out["hits"]) == 5 and out["rerank"] == "verify", out
        ids = [h["item_id"] for h in out["hits"]]
        assert it not in ids and len(set(ids)) == 5
        right += product[ids[0]] == product[it]
        # Its stored local features are the query's: the near duplicates among the hits verify.
        assert any(h.get("inliers", 0) >= 8 for h in out["hits"]), out
    assert right >= len(items) - 1, right  # train photos of one product are near duplicates
    after = metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="Embed")
    assert after == before, "a search by item embeds nothing"
    plain = json.loads(cli(mesh_env, "similar", items[0], "--catalog", "grocery", "--rerank", "none",
                           "--json").stdout)
    assert items[0] not in [h["item_id"] for h in plain["hits"]] and plain["rerank"] == "none"
    r = cli(mesh_env, "similar", "no-such-item", "--catalog", "grocery", check=False)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "no-such-item" in r.stderr and "Traceback" not in r.stderr
    r = cli(mesh_env, "similar", items[0], "--catalog", "grocery", "--rerank", "qam", check=False)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "query photo" in r.stderr


def test_batch_search_answers_in_order_with_merged_forwards(mesh_env, ingested, grocery, tmp_path):
    """BatchSearch: each search's answer in order, the same hits as its own Search, a bad image's own
    error beside the others' answers, and the embedder's forwards merged (fewer forwards than images)."""
    from visearch.client import Client
    from visearch.mesh import load_state, read_admin_key

    data = Path(mesh_env["VISEARCH_DATA_DIR"])
    state = load_state(data)
    comps = {c["name"]: c for c in state["components"]}
    photos = [p.path.read_bytes() for p in grocery["val"] if p.is_product][:7]
    images = photos[:3] + [b"not an image at all"] + photos[3:]
    with Client(state["gateway"], api_key=read_admin_key(data), timeout=120) as c:
        singles = [c.search(img, catalog="grocery", top_k=5, rerank="none") for img in photos]
        emb = scrape(comps["embedding"]["metrics"])
        forwards0 = metric(emb, "visearch_embed_batch_size_count")
        images0 = metric(emb, "visearch_embed_batch_size_sum")
        results = c.search_many(images, catalog="grocery", top_k=5, rerank="none")
        emb = scrape(comps["embedding"]["metrics"])
        forwards = metric(emb, "visearch_embed_batch_size_count") - forwards0
        embedded = metric(emb, "visearch_embed_batch_size_sum") - images0
        assert len(results) == len(images)
        bad = results[3]
        assert bad.HasField("error") and bad.error.code == "INVALID_ARGUMENT" and "image" in bad.error.message, bad
        answered = [r for n, r in enumerate(results) if n != 3]
        for single, r in zip(singles, answered, strict=True):
            assert r.HasField("response"), r
            assert [h.item_id for h in r.response.hits] == [h.item_id for h in single.hits]
            assert [h.score for h in r.response.hits] == pytest.approx([h.score for h in single.hits], abs=1e-4)
        assert embedded >= len(photos) and forwards < embedded / 2, (forwards, embedded)
        # The default re-rank ("verify"): the queries' local features are merged too (a batch of 64
        # searches would otherwise make 64 ExtractLocal calls at once, at the service's in-flight
        # limit), and each answer, its `match` flags included, is its own Search's.
        verified = [c.search(img, catalog="grocery", top_k=5) for img in photos]
        calls0 = metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="ExtractLocal")
        results = c.search_many(photos, catalog="grocery", top_k=5)
        calls = metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="ExtractLocal") - calls0
        for single, r in zip(verified, results, strict=True):
            assert r.HasField("response") and r.response.rerank == single.rerank == "verify", r
            assert [(h.item_id, h.match) for h in r.response.hits] == [(h.item_id, h.match) for h in single.hits]
        assert 1 <= calls < len(photos), calls
    import grpc

    from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    auth = (("authorization", f"Bearer {read_admin_key(data)}"),)
    with grpc.insecure_channel(state["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for n in (0, 65):
            req = gateway_pb2.BatchSearchRequest(searches=[gateway_pb2.SearchRequest(catalog="grocery",
                                                                                     image=photos[0])] * n)
            with pytest.raises(grpc.RpcError) as err:
                stub.BatchSearch(req, metadata=auth, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 64" in err.value.details()


def test_backup_and_restore_answer_every_query_the_same(mesh_env, ingested, val_search, catalog, tmp_path):
    """backup -> restore into a new catalog -> every P1 query answers the same (hits, scores, match
    flags; a region method too), nothing embedded again; a damaged backup, a model version the
    repository lacks, a stream cut short and an existing name are refused, and leave no catalog."""
    from visearch import backup
    from visearch.client import Client
    from visearch.mesh import load_state

    data = Path(mesh_env["VISEARCH_DATA_DIR"])
    comps = {c["name"]: c for c in load_state(data)["components"]}
    out = tmp_path / "backup"
    manifest = json.loads(cli(mesh_env, "backup", "--catalog", "grocery", "--out", str(out), "--json").stdout)
    cats = {c["name"]: c for c in jsonl(cli(mesh_env, "catalogs", "--json").stdout)}
    assert manifest["objects"] == cats["grocery"]["objects"] and manifest["items"] == len(catalog)
    assert manifest["storage"] == {"regions": "float", "index": "hnsw"}
    assert manifest["model"]["version"] == cats["grocery"]["model"].rpartition(":")[2]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "records-00000.bin"]

    before = metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="Embed")
    restored = json.loads(cli(mesh_env, "restore", str(out), "--catalog", "grocery_copy", "--json").stdout)
    assert restored["objects"] == manifest["objects"] and restored["items"] == len(catalog)
    assert metric(scrape(comps["embedding"]["metrics"]), "visearch_rpc_seconds_count", method="Embed") == before

    queries = [str(q.path) for q in val_search["queries"]]

    def answers(cat: str, paths: list[str], *flags: str) -> list:
        got = jsonl(cli(mesh_env, "search", *paths, "--catalog", cat, "--top-k", "20", "--json", *flags).stdout)
        return [[(h["item_id"], round(h["score"], 5), h.get("match", False)) for h in o["hits"]] for o in got]

    assert answers("grocery_copy", queries) == answers("grocery", queries)
    assert answers("grocery_copy", queries[::5], "--rerank", "qam") == answers("grocery", queries[::5], "--rerank", "qam")

    def refused(folder: Path, name: str, code: str, words: str) -> None:
        r = cli(mesh_env, "restore", str(folder), "--catalog", name, check=False)
        assert r.returncode == 1 and code in r.stderr and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert name not in {c["name"] for c in jsonl(cli(mesh_env, "catalogs", "--json").stdout)}

    r = cli(mesh_env, "restore", str(out), "--catalog", "grocery_copy", check=False)
    assert r.returncode == 1 and "ALREADY_EXISTS" in r.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in out.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    blob = bytearray((damaged / "records-00000.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "records-00000.bin").write_bytes(bytes(blob))
    refused(damaged, "grocery_damaged", "damaged", "sha256")

    recs = list(backup.records(out, backup.verify(out), "grocery_other_model"))
    recs[0].header.model.version = "99"
    with Client.local(data) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.import_catalog(recs)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "99" in exc.value.details()
        recs[0].header.model.version = manifest["model"]["version"]
        recs[0].header.catalog = "grocery_cut"
        with pytest.raises(grpc.RpcError) as exc:
            client.import_catalog(recs[:-1])  # no trailer: the stream was cut
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        names = {c.name for c in client.catalogs()}
    assert not {"grocery_other_model", "grocery_cut"} & names


def test_duplicates_found_reported_and_skipped(mesh_env, grocery, tmp_path):
    """Planted copies of a photo (re-encoded, resized, cropped) are one group of `visearch duplicates`
    and nothing else is among distinct photos of the same products; at ingestion, --duplicates report
    lists a copy with what it copies and stores it, --duplicates skip leaves it out."""
    from bench.duplicates_eval import copies

    photos = grocery["train"][1::12][:80]
    write_manifest(photos, tmp_path / "base.csv")
    cli(mesh_env, "ingest", "--manifest", str(tmp_path / "base.csv"), "--catalog", "dups", "--wait")
    original = photos[7]
    made = copies(original.path, tmp_path)
    (tmp_path / "copies.csv").write_text("item_id,path\n" + "".join(f"copy-{k},{f}\n" for k, f in made.items()
                                                                    if k != "corner10"))
    r = json.loads(cli(mesh_env, "ingest", "--manifest", str(tmp_path / "copies.csv"), "--catalog", "dups", "--wait",
                       "--duplicates", "report", "--json").stdout)
    assert r["ok"] == 3 and r["duplicates"] == {f"copy-{k}": {"of": item_id(original), "skipped": False}
                                                for k in ("q40", "small", "crop5")}, r
    (tmp_path / "skip.csv").write_text(f"item_id,path\ncopy-corner10,{made['corner10']}\nother,{photos[8].path}\n")
    r = json.loads(cli(mesh_env, "ingest", "--manifest", str(tmp_path / "skip.csv"), "--catalog", "dups", "--wait",
                       "--duplicates", "skip", "--json").stdout)
    assert r["ok"] == 2 and r["failed"] == 0, r
    assert r["duplicates"]["copy-corner10"]["skipped"] and r["duplicates"]["copy-corner10"]["of"] in {
        item_id(original), "copy-q40", "copy-small", "copy-crop5"}
    assert r["duplicates"]["other"] == {"of": item_id(photos[8]), "skipped": True}  # a stored photo uploaded again
    for skipped in ("copy-corner10", "other"):
        gone = cli(mesh_env, "get", skipped, "--catalog", "dups", check=False)
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

    listed = [x["item_id"] for x in jsonl(cli(mesh_env, "items", "--catalog", "dups", "--page-size", "7", "--json").stdout)]
    assert listed == sorted([item_id(p) for p in photos] + ["copy-crop5", "copy-q40", "copy-small"])  # `visearch items`
    found = json.loads(cli(mesh_env, "duplicates", "--catalog", "dups", "--json").stdout)
    assert found["items"] == 80 + 3 and found["unreadable"] == []
    assert found["groups"] == [sorted([item_id(original), "copy-crop5", "copy-q40", "copy-small"])], found
    assert all(n >= 0.98 for n in found["min_ncc"])
    r = cli(mesh_env, "ingest", "--manifest", str(tmp_path / "skip.csv"), "--catalog", "dups", "--duplicates", "maybe",
            check=False)
    assert r.returncode == 2 and "maybe" in r.stderr


def test_ingest_by_path_inside_roots_only(mesh_env, grocery, tmp_path):
    photo = grocery["val"][0].path
    ok = tmp_path / "ok.csv"
    ok.write_text(f"item_id,path\nbypath1,{photo}\n")
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(ok), "--catalog", "paths", "--wait", "--by-path",
                         "--json").stdout)
    assert res["ok"] == 1
    outside = tmp_path / "outside.csv"
    (tmp_path / "x.jpg").write_bytes(photo.read_bytes())
    outside.write_text(f"item_id,path\nbypath2,{tmp_path / 'x.jpg'}\n")
    r = cli(mesh_env, "ingest", "--manifest", str(outside), "--catalog", "paths", "--by-path", check=False)
    assert r.returncode != 0 and "INVALID_ARGUMENT" in r.stderr and "ingest roots" in r.stderr


def test_bad_input_gets_reasons_and_mesh_stays_up(mesh_env, ingested, grocery, tmp_path):
    good = grocery["val"][0].path
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:2000])
    out = jsonl(cli(mesh_env, "search", str(text), str(good), str(trunc), str(tmp_path / "missing.jpg"),
                    "--catalog", "grocery", "--json").stdout)
    assert out[0]["error"]["code"] == "INVALID_ARGUMENT" and "not an image" in out[0]["error"]["message"]
    assert out[1]["hits"], "one bad query does not stop the others"
    assert out[2]["error"]["code"] == "INVALID_ARGUMENT" and "truncated" in out[2]["error"]["message"]
    assert out[3]["error"]["code"] == "INVALID_ARGUMENT"
    unknown = jsonl(cli(mesh_env, "search", str(good), "--catalog", "nosuchcatalog", "--json", check=False).stdout)
    assert unknown[0]["error"]["code"] == "NOT_FOUND"

    manifest = tmp_path / "bad.csv"
    manifest.write_text(f"item_id,path\nbad_text,{text}\nbad_trunc,{trunc}\nbad_missing,{tmp_path / 'nope.jpg'}\n"
                        f"good_one,{good}\n")
    res = json.loads(cli(mesh_env, "ingest", "--manifest", str(manifest), "--catalog", "grocery", "--wait",
                         "--json").stdout)
    assert res["ok"] == 1 and res["failed"] == 3
    assert "not an image" in res["failures"]["bad_text"] and "truncated" in res["failures"]["bad_trunc"]
    assert "No such file" in res["failures"]["bad_missing"]
    st = json.loads(cli(mesh_env, "status", "--json").stdout)
    assert all(c["health"] == "SERVING" for c in st["components"])


def scrape(address: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def worker_metric(comp: dict, env: dict, name: str, **labels) -> float:
    """`metric` summed over a worker's pool children (child i serves /metrics on the worker's port + i;
    a child that ran no task has no sample yet)."""
    from visearch.mesh import worker_concurrency

    host, port = comp["metrics"].rsplit(":", 1)
    total = 0.0
    for i in range(worker_concurrency(env)):
        try:
            total += metric(scrape(f"{host}:{int(port) + i}"), name, **labels)
        except AssertionError:
            pass
    return total


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name or not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total, found = total + float(value), True
    assert found, f"{name} {labels} not exported"
    return total


def test_metrics_and_request_ids(mesh_env, ingested, grocery, catalog):
    from visearch.mesh import load_state, read_admin_key

    data = Path(mesh_env["VISEARCH_DATA_DIR"])
    comps = {c["name"]: c for c in load_state(data)["components"]}
    import grpc

    from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    key = read_admin_key(data)
    with grpc.insecure_channel(comps["gateway"]["address"]) as ch:
        gateway_pb2_grpc.GatewayServiceStub(ch).Search(
            gateway_pb2.SearchRequest(catalog="grocery", image=grocery["val"][3].path.read_bytes(), top_k=3),
            metadata=(("authorization", f"Bearer {key}"), ("x-request-id", "rid-test-4242")), timeout=60)
    gw = scrape(comps["gateway"]["metrics"])
    assert metric(gw, "visearch_rpc_seconds_count", method="Search", code="OK") >= 1
    assert metric(gw, "visearch_rpc_seconds_count", method="IngestItems", code="OK") >= 1
    import time as _t

    deadline = _t.monotonic() + 15
    while _t.monotonic() < deadline:  # index sizes refresh every 10 s
        gw = scrape(comps["gateway"]["metrics"])
        if "visearch_index_objects{" in gw:
            break
        _t.sleep(1)
    assert metric(gw, "visearch_index_objects", catalog="grocery") >= len(catalog) - 1
    metric(gw, "visearch_ingest_queue_depth")
    emb = scrape(comps["embedding"]["metrics"])
    assert metric(emb, "visearch_embed_batch_size_count") > 0 and metric(emb, "visearch_embed_batch_size_sum") >= len(catalog)
    done = worker_metric(comps["worker"], mesh_env, "visearch_ingested_items_total", catalog="grocery", outcome="done")
    assert done >= len(catalog)
    # The caller's request id is on the log lines of every service the search went through.
    for name in ("gateway", "detection", "embedding", "rerank"):
        assert "rid-test-4242" in Path(comps[name]["log"]).read_text(), name


def test_get_and_delete(mesh_env, ingested, catalog):
    target = item_id(catalog[0])
    item = json.loads(cli(mesh_env, "get", target, "--catalog", "grocery").stdout)
    assert item["itemId"] == target and item["metadata"]["product"] == catalog[0].fine_name
    assert json.loads(cli(mesh_env, "delete", target, "--catalog", "grocery").stdout) == {"deleted": 1}
    r = cli(mesh_env, "get", target, "--catalog", "grocery", check=False)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr


def test_down_stops_everything(mesh_env, ingested):
    from visearch.mesh import alive, load_state

    state = load_state(Path(mesh_env["VISEARCH_DATA_DIR"]))
    pids = [c["pid"] for c in state["components"] if c["pid"]]
    cli(mesh_env, "down")
    assert not any(alive(p) for p in pids)
    r = cli(mesh_env, "status", "--json")
    assert json.loads(r.stdout)["components"] == []
