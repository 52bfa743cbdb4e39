"""Each gRPC service as its own process: health, reflection, real inference, clear errors, graceful stop."""

from __future__ import annotations

import io
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from tests.conftest import channel
from visearch import liteserver
from visearch.common.v1 import common_pb2
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.rerank.v1 import rerank_pb2, rerank_pb2_grpc


def listed_services(addr: str) -> set[str]:
    with channel(addr) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        return {s.name for s in resp.list_services_response.service}


def test_embedding_service(services, grocery):
    addr = services.start("embedding")
    assert "visearch.embedding.v1.EmbeddingService" in listed_services(addr)
    assert "model warmed up" in services.procs["embedding"].log.read_text()  # before SERVING
    photos = [p for p in grocery["train"] if p.fine_name == "Arla-Standard-Milk"][:2]
    other = next(p for p in grocery["train"] if p.fine_name == "Oatly-Oat-Milk")
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        info = stub.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=10).model
        items = [embedding_pb2.EmbedItem(image=p.path.read_bytes()) for p in [*photos, other]]
        resp = stub.Embed(embedding_pb2.EmbedRequest(items=items), timeout=30)
        v = np.array([e.values for e in resp.embeddings])
        assert v.shape == (3, info.dim) and resp.model.version == info.version
        assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
        assert v[0] @ v[1] > v[0] @ v[2], "same product should be closer than another product"
        # The same photo embeds identically alone and in a batch.
        alone = stub.Embed(embedding_pb2.EmbedRequest(items=items[:1]), timeout=30).embeddings[0].values
        assert np.allclose(alone, v[0], atol=1e-5)
        # A crop box changes what is embedded.
        w, h = Image.open(photos[0].path).size
        boxed = embedding_pb2.EmbedItem(image=items[0].image, box=common_pb2.BoundingBox(x1=0, y1=0, x2=w / 2, y2=h / 2))
        cropped = stub.Embed(embedding_pb2.EmbedRequest(items=[boxed]), timeout=30).embeddings[0].values
        assert not np.allclose(cropped, v[0], atol=1e-3)

        # A large JPEG is decoded once, at the reduced scale its smallest crop still allows: its full
        # frame and a box in its own pixels embed as the same photo at its own size does.
        big = io.BytesIO()
        Image.open(photos[0].path).resize((8 * w, 8 * h), Image.BICUBIC).save(big, "JPEG", quality=95)
        pair = stub.Embed(embedding_pb2.EmbedRequest(items=[
            embedding_pb2.EmbedItem(image=big.getvalue()),
            embedding_pb2.EmbedItem(image=big.getvalue(), box=common_pb2.BoundingBox(x1=0, y1=0, x2=4 * w, y2=4 * h))]),
            timeout=30).embeddings
        assert np.dot(pair[0].values, v[0]) > 0.97 and np.dot(pair[1].values, cropped) > 0.97
        assert np.dot(pair[1].values, v[0]) < np.dot(pair[0].values, v[0])  # the box is still the box

        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(embedding_pb2.EmbedRequest(items=[items[0], embedding_pb2.EmbedItem(image=b"junk")]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item 1" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(embedding_pb2.EmbedRequest(items=items * 20), timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Still serving after bad input.
        assert stub.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=10).model.dim == info.dim


def test_rerank_orders_and_refuses_unknown_methods(services):
    addr = services.start("rerank")  # no vector store configured: only "none"
    cands = [rerank_pb2.Candidate(item_id=i, object_id=f"{i}#0", score=s) for i, s in (("a", .2), ("b", .9), ("c", .5))]
    with channel(addr) as ch:
        stub = rerank_pb2_grpc.RerankServiceStub(ch)
        resp = stub.Rerank(rerank_pb2.RerankRequest(candidates=cands, top_k=2), timeout=10)
        assert [h.item_id for h in resp.hits] == ["b", "c"] and resp.method == "none"
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(rerank_pb2.RerankRequest(candidates=cands, method="bogus"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "qam" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(rerank_pb2.RerankRequest(candidates=cands, method="qam"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "MILVUS_URI" in err.value.details()


def test_embedding_service_returns_base_regions(services, grocery):
    addr = services.start("embedding")
    photo = grocery["val"][0].path.read_bytes()
    w, h = Image.open(io.BytesIO(photo)).size
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        plain = stub.Embed(embedding_pb2.EmbedRequest(items=[embedding_pb2.EmbedItem(image=photo)]), timeout=30)
        assert not plain.embeddings[0].HasField("regions")
        box = common_pb2.BoundingBox(x1=w / 4, y1=h / 4, x2=w * 3 / 4, y2=h)
        resp = stub.Embed(embedding_pb2.EmbedRequest(items=[embedding_pb2.EmbedItem(image=photo),
                                                            embedding_pb2.EmbedItem(image=photo, box=box)],
                                                     regions=True), timeout=30)
    full, crop = (e.regions for e in resp.embeddings)
    np.testing.assert_allclose(resp.embeddings[0].values, plain.embeddings[0].values, atol=1e-5)
    for r, frame in ((full, (0, 0, w, h)), (crop, (w / 4, h / 4, w * 3 / 4, h))):
        n = len(r.boxes)
        assert 14 <= n <= 22 and len(r.features) == n * r.dim and r.dim == 256  # 14 OSPP + up to 8 FMP regions
        boxes = np.array([(b.x1, b.y1, b.x2, b.y2) for b in r.boxes])
        np.testing.assert_allclose(boxes[0], frame, atol=0.5)  # the first OSPP region is the whole frame
        assert (boxes[:, 0] >= frame[0] - 0.5).all() and (boxes[:, 2] <= frame[2] + 0.5).all()
        assert (boxes[:, 1] >= frame[1] - 0.5).all() and (boxes[:, 3] <= frame[3] + 0.5).all()
        assert np.linalg.norm(r.query) == pytest.approx(1.0, abs=1e-4)
        feats = np.array(r.features).reshape(n, r.dim)
        assert feats[0] @ np.array(r.query) > 0  # the whole frame resembles its own query


def test_sigterm_drains_and_exits_cleanly(services):
    services.start("rerank")
    proc = services.procs["rerank"]
    proc.p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert proc.p.wait(15) == 0
    assert time.monotonic() - t0 < 10
    assert '"stopped"' in proc.log.read_text() or "stopped" in proc.log.read_text()


def test_gateway_not_serving_until_dependencies_answer(services, redis_url, milvus_uri):
    services.env.update(VISEARCH_REDIS_URL=redis_url, VISEARCH_MILVUS_URI=milvus_uri)
    services.env["VISEARCH_RERANK_ADDR"] = "127.0.0.1:1"  # nothing listens there yet
    services.start("detection")
    services.start("embedding")
    addr = services.start("gateway", wait=False)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import health_serving, wait_until

    def status():
        with channel(addr) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status

    wait_until(lambda: status() is not None, 60, "gateway listening")
    time.sleep(1.5)  # several readiness rounds
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING, "not SERVING while re-ranking is unreachable"
    services.procs["gateway"].stop()
    services.start("rerank")
    services.start("gateway")  # the conftest waits for SERVING
    wait_until(lambda: health_serving(services.env["VISEARCH_GATEWAY_ADDR"]), 10, "gateway")


def test_gateway_started_before_its_redis_and_milvus_serves_once_they_come(services, tmp_path):
    """Start-up cannot race: a gateway and a re-rank service whose Redis and Milvus are not up yet
    stay up, NOT_SERVING, and turn SERVING by themselves once both come (nothing restarted)."""
    import shutil

    import redis
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import Proc, free_port, wait_until

    redis_port, milvus_port = free_port(), free_port()
    services.env.update(VISEARCH_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                        VISEARCH_MILVUS_URI=f"http://127.0.0.1:{milvus_port}")
    for name in ("detection", "embedding"):
        services.start(name)
    rerank = services.start("rerank", wait=False)
    gateway = services.start("gateway", wait=False)

    def status(addr):
        with channel(addr) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status

    for addr in (rerank, gateway):
        wait_until(lambda a=addr: status(a) is not None, 60, f"{addr} listening")
    time.sleep(3)  # several readiness rounds with both dependencies down
    for name, addr in (("rerank", rerank), ("gateway", gateway)):
        assert services.procs[name].p.poll() is None, f"{name} exited while its dependencies were down"
        assert status(addr) == health_pb2.HealthCheckResponse.NOT_SERVING
    procs = [Proc([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(tmp_path)], tmp_path / "redis.log"),
             Proc(liteserver.argv(tmp_path / "milvus", milvus_port), tmp_path / "milvus.log")]
    try:
        wait_until(lambda: redis.Redis(port=redis_port).ping(), 20, "redis")
        for addr in (rerank, gateway):
            wait_until(lambda a=addr: status(a) == health_pb2.HealthCheckResponse.SERVING, 90, f"{addr} SERVING")
        assert all(services.procs[n].p.poll() is None for n in ("rerank", "gateway"))
    finally:
        for p in procs:
            p.stop()


def test_service_refuses_to_start_without_required_settings(services):
    import subprocess
    import sys

    env = {k: v for k, v in services.env.items() if k != "VISEARCH_GATEWAY_PORT"}
    r = subprocess.run([sys.executable, "-m", "services.gateway"], env=env, capture_output=True, timeout=60)
    assert r.returncode != 0 and b"gateway_port" in r.stderr


def test_gateway_pinned_to_another_model_refuses_clearly(services, redis_url, milvus_uri, grocery):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import wait_until
    from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    services.env.update(VISEARCH_REDIS_URL=redis_url, VISEARCH_MILVUS_URI=milvus_uri, VISEARCH_AUTH="off",
                        VISEARCH_EXPECTED_MODEL="embedder:99")
    for name in ("detection", "embedding", "rerank"):
        services.start(name)
    addr = services.start("gateway", wait=False)

    def status():
        with grpc.insecure_channel(addr) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status

    wait_until(lambda: status() is not None, 60, "gateway listening")
    time.sleep(1.5)
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(addr) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        item = gateway_pb2.IngestItem(item_id="x", image=grocery["val"][0].path.read_bytes())
        with pytest.raises(grpc.RpcError) as err:
            stub.IngestItems(gateway_pb2.IngestItemsRequest(catalog="pinned", items=[item]), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned to embedder:99" in err.value.details()
    assert "pinned to embedder:99" in services.procs["gateway"].log.read_text()


def test_rerank_with_regions_from_the_store(services, milvus_uri):
    """QAM finds the catalog image whose regions, merged, match the query, and says where."""
    from visearch.inference import ModelMeta
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    rng = np.random.default_rng(5)
    d = 32
    obj_a, obj_b = np.abs(rng.normal(size=d)), np.abs(rng.normal(size=d))
    query = (obj_a + obj_b) / np.linalg.norm(obj_a + obj_b)
    meta = ModelMeta(name="embedder", version="1", input_name="images", output_name="embeddings", input_size=32, dim=8)
    store = VectorStore(StoreSettings(milvus_uri=milvus_uri))
    g = np.eye(8, dtype=np.float32)
    store.ensure_catalog("rr", meta, "float")
    store.upsert_items("rr", [(i, [(g[n], (0, 0, 100, 100))], {}) for n, i in enumerate(("clutter", "object", "bare"))])
    boxes = np.array([[0, 0, 100, 100], [0, 0, 50, 50], [40, 40, 60, 70], [60, 40, 80, 70], [50, 50, 100, 100]], np.float32)
    clutter = np.abs(rng.normal(size=(5, d))).astype(np.float32)
    scene = np.vstack([clutter[0] + obj_a + obj_b, clutter[1], obj_a, obj_b, clutter[2]]).astype(np.float32)
    store.upsert_regions("rr", [("clutter#0", clutter, boxes), ("object#0", scene, boxes)])
    store.flush("rr")
    store.close()

    services.env["VISEARCH_MILVUS_URI"] = milvus_uri
    addr = services.start("rerank")
    cands = [rerank_pb2.Candidate(item_id=i, object_id=f"{i}#0", score=s)
             for i, s in (("clutter", .9), ("object", .5), ("bare", .7))]
    with channel(addr) as ch:
        stub = rerank_pb2_grpc.RerankServiceStub(ch)
        req = rerank_pb2.RerankRequest(catalog="rr", candidates=cands, query_region=query.tolist(),
                                       query_embedding=g[0].tolist())
        # The default with a store is "verify"; asked without the query's local features, "qe".
        assert stub.Rerank(req, timeout=10).method == "qe"
        req.method = "qam"
        qam = stub.Rerank(req, timeout=10)
        assert qam.method == "qam" and qam.hits[0].item_id == "object"
        assert qam.hits[0].score == pytest.approx(1.0, abs=1e-4)
        r = qam.hits[0].region
        assert (r.x1, r.y1, r.x2, r.y2) == (40, 40, 80, 70)  # the two regions holding the object, merged
        bare = next(h for h in qam.hits if h.item_id == "bare")
        assert bare.score == pytest.approx(0.7) and not bare.HasField("region")  # no regions: global score stands
        req.method = "regions"
        single = stub.Rerank(req, timeout=10)
        assert single.hits[0].score < 0.99  # no single region holds the whole object
        req.method = "qe"
        qe = stub.Rerank(req, timeout=10)
        assert [h.item_id for h in qe.hits][0] == "clutter" and qe.method == "qe"
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(rerank_pb2.RerankRequest(catalog="rr", candidates=cands, method="qam"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query_region" in err.value.details()


def test_embedding_service_returns_local_features(services, grocery):
    """Local features in the same call as the descriptors: each item's inside its box, the stored
    budget by default, more when the caller asks (a query)."""
    from visearch import local

    addr = services.start("embedding")
    photo = grocery["val"][0].path.read_bytes()
    w, h = Image.open(io.BytesIO(photo)).size
    box = common_pb2.BoundingBox(x1=w / 4, y1=h / 4, x2=w * 3 / 4, y2=h)
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        items = [embedding_pb2.EmbedItem(image=photo), embedding_pb2.EmbedItem(image=photo, box=box)]
        resp = stub.Embed(embedding_pb2.EmbedRequest(items=items, local_features=True), timeout=30)
        more = stub.Embed(embedding_pb2.EmbedRequest(items=items[:1], local_features=True, local_limit=1000), timeout=30)
        plain = stub.Embed(embedding_pb2.EmbedRequest(items=items[:1]), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(embedding_pb2.EmbedRequest(items=items[:1], local_features=True, local_limit=10**6), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "local_limit" in err.value.details()
    full, crop = (local.Features.from_bytes(e.local_features) for e in resp.embeddings)
    assert len(resp.embeddings[0].local_features) <= local.BUDGET and len(full) == local.capacity("rootsift", 32)
    assert 0 < len(crop) <= len(full)
    assert (crop.xy[:, 0] >= w / 4 - 0.5).all() and (crop.xy[:, 1] >= h / 4 - 0.5).all()
    assert (crop.xy[:, 0] <= 3 * w / 4 + 0.5).all()
    assert len(local.Features.from_bytes(more.embeddings[0].local_features)) > len(full)
    assert not plain.embeddings[0].local_features
    np.testing.assert_allclose(resp.embeddings[0].values, plain.embeddings[0].values, atol=1e-5)


def test_extract_local_gives_embeds_local_features_without_a_forward(services, grocery):
    """ExtractLocal (a search's query, beside its boxes' forward) returns the bytes Embed returns for
    the same items and settings, on a photo large enough to be decoded at a reduced JPEG scale."""
    addr = services.start("embedding")
    img = Image.open(grocery["val"][1].path).convert("RGB")
    buf = io.BytesIO()
    img.resize((img.width * 4, img.height * 4)).save(buf, "JPEG", quality=90)
    photo, (w, h) = buf.getvalue(), (img.width * 4, img.height * 4)
    box = common_pb2.BoundingBox(x1=w / 4, y1=h / 4, x2=w * 3 / 4, y2=h)
    items = [embedding_pb2.EmbedItem(image=photo), embedding_pb2.EmbedItem(image=photo, box=box)]
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        # The full frame alone is decoded at half scale; with the box (which needs every pixel) at full scale.
        for some, limit, side in (([items[0]], 1000, 256), (items, 0, 0), (items, 1000, 256)):
            embedded = stub.Embed(embedding_pb2.EmbedRequest(items=some, local_features=True, local_limit=limit,
                                                             local_max_side=side), timeout=30)
            got = stub.ExtractLocal(embedding_pb2.ExtractLocalRequest(items=some, local_limit=limit,
                                                                      local_max_side=side), timeout=30)
            assert list(got.local_features) == [e.local_features for e in embedded.embeddings]
            assert all(len(f) > 100 for f in got.local_features)
        bad = {"no items": embedding_pb2.ExtractLocalRequest(),
               "local_limit": embedding_pb2.ExtractLocalRequest(items=items, local_limit=10**6),
               "local_max_side": embedding_pb2.ExtractLocalRequest(items=items, local_max_side=3),
               "item 0": embedding_pb2.ExtractLocalRequest(items=[embedding_pb2.EmbedItem(image=b"not an image")]),
               "item 1: crop box": embedding_pb2.ExtractLocalRequest(items=[items[0], embedding_pb2.EmbedItem(
                   image=photo, box=common_pb2.BoundingBox(x1=w + 5, y1=0, x2=w + 50, y2=h))])}
        for reason, req in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.ExtractLocal(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details(), reason


def test_rerank_verifies_candidates_against_stored_local_features(services, milvus_uri, grocery, tmp_path):
    """"verify": the candidate that shows the query's object (here the same photo, rotated and scaled)
    is verified, moves first and is a match, with its correspondences; another product is not."""
    import cv2

    from visearch import local
    from visearch.imaging import decode_image
    from visearch.inference import ModelMeta
    from visearch.settings import StoreSettings
    from visearch.store import VectorStore

    photos = {}
    for p in grocery["train"]:
        if p.is_product:
            photos.setdefault(p.fine_id, p.path)
    (pid_a, path_a), (_, path_b) = list(photos.items())[:2]
    img_a = np.asarray(decode_image(path_a.read_bytes()))
    hh, ww = img_a.shape[:2]
    m = cv2.getRotationMatrix2D((ww / 2, hh / 2), 20, 0.8)
    query = np.ascontiguousarray(cv2.warpAffine(img_a, m, (ww, hh), borderValue=(255, 255, 255)))
    ext = local.RootSift()
    cap = local.capacity("rootsift", 32)
    meta = ModelMeta(name="embedder", version="1", input_name="images", output_name="embeddings", input_size=32, dim=8)
    settings = StoreSettings(milvus_uri=milvus_uri, local_dir=str(tmp_path / "local"))
    store = VectorStore(settings)
    g = np.eye(8, dtype=np.float32)
    store.ensure_catalog("vv", meta)
    store.upsert_local("vv", {"same#0": ext(img_a).inside((0, 0, ww, hh), cap).to_bytes(),
                              "other#0": ext(np.asarray(decode_image(path_b.read_bytes()))).inside((0, 0, 1e9, 1e9), cap)
                              .to_bytes()})
    store.upsert_items("vv", [("other", [(g[0], (0, 0, ww, hh))], {}), ("same", [(g[1], (0, 0, ww, hh))], {}),
                              ("bare", [(g[2], (0, 0, ww, hh))], {})])
    store.flush("vv")
    store.close()

    # The parameters recorded beside the catalog's model (embedder:1): its match threshold, on the
    # candidate's similarity, under which "same" (0.7) would be no match by default (0.7331).
    repo = tmp_path / "repo"
    (repo / "embedder" / "1").mkdir(parents=True)
    local.VerifyParams(threshold=0.65, match_on="similarity").write(repo / "embedder" / "1" / "verify.json")
    assert local.VerifyParams().threshold > 0.7
    services.env.update(VISEARCH_MILVUS_URI=milvus_uri, VISEARCH_LOCAL_DIR=str(tmp_path / "local"),
                        VISEARCH_MODEL_REPOSITORY=str(repo))
    addr = services.start("rerank")
    box = common_pb2.BoundingBox(x1=0, y1=0, x2=ww, y2=hh)
    cands = [rerank_pb2.Candidate(item_id=i, object_id=f"{i}#0", score=s, box=box)
             for i, s in (("other", .9), ("bare", .8), ("same", .7))]
    qf = ext(query).to_bytes()
    with channel(addr) as ch:
        stub = rerank_pb2_grpc.RerankServiceStub(ch)
        req = rerank_pb2.RerankRequest(catalog="vv", candidates=cands, method="verify", query_embedding=g[0].tolist(),
                                       query_local=qf, query_width=ww, query_height=hh, correspondences=True)
        resp = stub.Rerank(req, timeout=30)
        assert resp.method == "verify" and [h.item_id for h in resp.hits][0] == "same", resp
        same = resp.hits[0]
        assert same.match and same.inliers >= 12 and len(same.correspondences) == same.inliers
        c = same.correspondences[0]
        assert 0 <= c.x <= ww and 0 <= c.query_x <= ww
        other = next(h for h in resp.hits if h.item_id == "other")
        bare = next(h for h in resp.hits if h.item_id == "bare")
        assert not other.match and other.inliers < 12 and not bare.match and bare.inliers == 0
        req.correspondences = False
        assert not stub.Rerank(req, timeout=30).hits[0].correspondences
        for bad, reason in ((b"", "query_local"), (b"\x07", "not a local-features record")):
            req.query_local = bad
            with pytest.raises(grpc.RpcError) as err:
                stub.Rerank(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
        # Features of another kind (ORB's binary descriptors) cannot be matched against the catalog's:
        # the request's fault, said so. A candidate gone from the catalog is reported before that.
        req.query_local = local.Orb()(query).to_bytes()
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be matched" in err.value.details()
        req.candidates.append(rerank_pb2.Candidate(item_id="gone", object_id="gone#0", score=.5, box=box))
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not in catalog" in err.value.details()
    assert pid_a in photos
