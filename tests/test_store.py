"""The vector store on a real Milvus Lite server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from visearch.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.settings import StoreSettings
from visearch.store import BOUNDED, VectorStore, WriteClock, check_catalog

pytestmark = pytest.mark.integration

META = ModelMeta(name="embedder", version="1", input_name="images", output_name="embeddings", input_size=32, dim=8)


def unit(rng, n=1):
    v = rng.standard_normal((n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=["milvus-lite", "milvus-server"])
def store(request):
    """The same contract on Milvus Lite (embedded default) and a real Milvus engine (production)."""
    uri = request.getfixturevalue("milvus_uri" if request.param == "milvus-lite" else "milvus_server_uri")
    s = VectorStore(StoreSettings(milvus_uri=uri))
    yield s
    s.close()


def test_upsert_is_idempotent_and_replaces_objects(store, request):
    cat = "t_" + request.node.name[:40]
    rng = np.random.default_rng(0)
    store.ensure_catalog(cat, META)
    vecs = unit(rng, 3)
    store.upsert_items(cat, [("a", [(vecs[0], (0, 0, 10, 10)), (vecs[1], (5, 5, 9, 9))], {"brand": "x"}),
                             ("b", [(vecs[2], (0, 0, 4, 4))], {"brand": "y"})])
    store.upsert_items(cat, [("b", [(vecs[2], (0, 0, 4, 4))], {"brand": "y"})])  # again: no duplicate
    assert store.count(cat) == 3
    # Re-ingesting "a" with one object drops its second row.
    store.upsert_items(cat, [("a", [(vecs[1], (1, 1, 2, 2))], {"brand": "x"})])
    objs = store.get_item(cat, "a")
    assert [o.object_id for o in objs] == ["a#0"] and objs[0].box == (1, 1, 2, 2)
    assert store.count(cat) == 2

    hits = store.search(cat, vecs[1], 5)
    assert hits[0].item_id == "a" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.item_id for h in store.search(cat, vecs[1], 5, {"brand": "y"})] == ["b"]
    assert store.search(cat, vecs[1], 5, {"brand": 'x" or item_id != "'}) == []  # quoting holds

    assert store.delete_items(cat, ["a", "zzz"]) == 1
    with pytest.raises(NotFound):
        store.get_item(cat, "a")


def test_model_mismatch_and_unknown_catalog(store):
    store.ensure_catalog("t_mismatch", META)
    other = ModelMeta(name="embedder", version="2", input_name="images", output_name="embeddings", input_size=32,
                      dim=8)
    with pytest.raises(FailedPrecondition, match="re-embed"):
        store.ensure_catalog("t_mismatch", other)
    with pytest.raises(NotFound):
        store.search("t_nothing_here", np.zeros(8, np.float32), 3)
    with pytest.raises(InvalidArgument):
        check_catalog("../etc")


def test_regions_are_stored_per_object_and_follow_their_item(store, request):
    from visearch.store import MAX_REGIONS

    cat = "t_" + request.node.name[:40]
    rng = np.random.default_rng(1)
    assert store.ensure_catalog(cat, META, "float").regions == "float"
    vecs = unit(rng, 3)
    store.upsert_items(cat, [("a", [(vecs[0], (0, 0, 10, 10)), (vecs[1], (5, 5, 9, 9))], {}),
                             ("b", [(vecs[2], (0, 0, 4, 4))], {})])
    feats = rng.random((5, 16)).astype(np.float32)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 5, 5], [5, 0, 10, 5], [0, 5, 5, 10], [5, 5, 10, 10]], np.float32)
    store.upsert_regions(cat, [("a#0", feats, boxes), ("a#1", feats[:3], boxes[:3]), ("b#0", feats[:1], boxes[:1])])
    store.upsert_regions(cat, [("b#0", feats[:1], boxes[:1])])  # again: replaced, not added
    got = store.get_regions(cat, ["a#0", "a#1", "b#0", "nope#0"])
    assert set(got) == {"a#0", "a#1", "b#0"}
    np.testing.assert_allclose(got["a#0"][0], feats, rtol=1e-6)
    np.testing.assert_allclose(got["a#0"][1], boxes)
    assert got["a#1"][0].shape == (3, 16) and got["b#0"][1].shape == (1, 4)
    v = store.get_vectors(cat, ["a#1", "b#0"])
    np.testing.assert_allclose(v["a#1"], vecs[1], rtol=1e-6)
    # Re-ingesting "a" with one object drops the regions of its second; deleting "b" drops its own.
    store.upsert_items(cat, [("a", [(vecs[0], (0, 0, 10, 10))], {})])
    assert set(store.get_regions(cat, ["a#0", "a#1"])) == {"a#0"}
    store.delete_items(cat, ["b"])
    assert store.get_regions(cat, ["b#0"]) == {}
    with pytest.raises(InvalidArgument, match="regions"):
        store.upsert_regions(cat, [("a#0", np.zeros((MAX_REGIONS + 1, 16), np.float32), np.zeros((MAX_REGIONS + 1, 4)))])
    with pytest.raises(FailedPrecondition, match="dim"):
        store.upsert_regions(cat, [("a#0", feats[:, :8], boxes)])
    store.ensure_catalog("t_no_regions_here", META)
    assert store.get_regions("t_no_regions_here", ["x#0"]) == {}


def test_generations_switch_atomically_by_alias(store, request):
    """A catalog is an alias over its live generation: a new generation is built beside it, written
    to, then made live with one alias change; the old one is dropped afterwards."""
    from visearch.store import GEN_RE

    cat = "t_" + request.node.name[:40]
    rng = np.random.default_rng(3)
    v1 = store.ensure_catalog(cat, META)
    assert (v1.number, v1.model_tag, v1.collection) == (1, "embedder:1", f"vsg_{cat}_1")
    old = unit(rng, 2)
    store.upsert_items(cat, [("a", [(old[0], (0, 0, 1, 1))], {}, "/img/a.jpg", 11),
                             ("b", [(old[1], (0, 0, 1, 1))], {}, "", 12)])
    assert store.write_targets(cat) == [v1]
    assert store.item_stamps(cat) == {"a": 11, "b": 12}
    assert store.item_rows(cat, ["a", "zz"])["a"][0].source == "/img/a.jpg"

    META2 = ModelMeta(name="embedder", version="2", input_name="images", output_name="embeddings", input_size=32, dim=8)
    v2 = store.create_generation(cat, META2)
    assert v2.number == 2 and store.building(cat) == v2 and store.write_targets(cat) == [v1, v2]
    assert store.live(cat) == v1, "a generation being built is not live"
    new = unit(rng, 2)
    store.upsert_items(v2, [("a", [(new[0], (0, 0, 1, 1))], {}, "/img/a.jpg", 11)])
    info = {c.name: c for c in store.list_catalogs()}[cat]
    assert (info.generation, info.objects, info.building, info.building_objects) == (1, 2, v2, 1)
    # Bounded (metrics): the same figures, at most a few seconds late.
    deadline = time.monotonic() + 15
    while (bounded := {c.name: c for c in store.list_catalogs(BOUNDED)}[cat]) != info and time.monotonic() < deadline:
        time.sleep(0.5)
    assert bounded == info
    assert store.search(cat, new[0], 1)[0].score < 0.99, "searches still read generation 1"

    store.switch(v2)
    assert store.live(cat) == v2 and store.catalog_model(cat) == ("embedder:2", 8)
    assert store.search(cat, new[0], 1)[0].score == pytest.approx(1.0, abs=1e-4)
    assert store.item_stamps(cat) == {"a": 11} and store.item_stamps(v1) == {"a": 11, "b": 12}
    with pytest.raises(FailedPrecondition, match="re-embed"):
        store.check_model(cat, META)
    with pytest.raises(FailedPrecondition, match="live"):
        store.drop_generation(v2)
    store.drop_generation(v1)
    assert [g.number for g in store.generations(cat)] == [2] and store.generation(cat, 1) is None
    assert not any(GEN_RE.match(n) and n.endswith(f"{cat}_1") for n in store.client.list_collections())


def test_catalogs_survive_a_milvus_lite_restart(tmp_path):
    """Collections come back released after Milvus restarts; the store loads them again instead of failing."""

    from tests.conftest import free_port, start_milvus_lite

    def start():
        port = free_port()
        return start_milvus_lite(tmp_path / "data", port, tmp_path / f"log{port}"), f"http://127.0.0.1:{port}"

    proc, uri = start()
    rng = np.random.default_rng(2)
    vecs = unit(rng, 2)
    s = VectorStore(StoreSettings(milvus_uri=uri))
    s.ensure_catalog("kept", META, "float")
    s.upsert_items("kept", [("a", [(vecs[0], (0, 0, 1, 1))], {}), ("b", [(vecs[1], (0, 0, 1, 1))], {})])
    s.upsert_regions("kept", [("a#0", np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32))])
    s.flush("kept")
    s.close()
    proc.stop()
    proc, uri = start()
    try:
        s = VectorStore(StoreSettings(milvus_uri=uri))
        assert s.count("kept") == 2 and s.search("kept", vecs[1], 1)[0].item_id == "b"
        assert list(s.get_regions("kept", ["a#0"])) == ["a#0"] and s.live("kept").regions == "float"
        s.ensure_catalog("kept", META)  # same model: accepted, nothing recreated
        s.close()
    finally:
        proc.stop()


def test_reads_run_bounded_only_when_nothing_wrote_lately(store, redis_url, request):
    """The write clock: a write makes the catalog's reads Strong (another process sees it at once);
    once the window (above Milvus's 5 s gracefulTime) has passed, reads run Bounded and still see it."""
    import time

    import redis

    cat = "t_clock_" + request.node.callspec.id.replace("-", "_")
    clock = WriteClock(redis.Redis.from_url(redis_url))
    settings = StoreSettings(milvus_uri=store.settings.milvus_uri, bounded_window_seconds=6.0)
    writer, reader = VectorStore(settings, clock), VectorStore(settings, clock)
    try:
        writer.ensure_catalog(cat, META)
        assert reader.read_level(cat) == "Bounded"  # nothing written yet
        vec = unit(np.random.default_rng(1))[0]
        writer.upsert_items(cat, [("a", [(vec, (0, 0, 4, 4))], {})])
        assert reader.read_level(cat) == "Strong" and reader.read_level(reader.resolve(cat)) == "Strong"
        assert [h.item_id for h in reader.search(cat, vec, 3)] == ["a"]  # the other process sees the write now
        assert set(reader.get_vectors(cat, ["a#0"], "Strong")) == {"a#0"}
        time.sleep(8.2)  # the window, plus the clock's whole second
        assert reader.read_level(cat) == "Bounded"
        assert [h.item_id for h in reader.search(cat, vec, 3)] == ["a"]
        assert set(reader.get_vectors(cat, ["a#0"], "Bounded")) == {"a#0"}
        assert writer.delete_items(cat, ["a"]) == 1  # a delete marks the catalog too
        assert reader.read_level(cat) == "Strong" and reader.search(cat, vec, 3) == []
        # Without a clock, with the window 0, or with the clock unreadable, every read is Strong;
        # a reader's own window decides (a writer with another window marks all the same).
        assert VectorStore(StoreSettings(milvus_uri=settings.milvus_uri)).read_level(cat) == "Strong"
        off = StoreSettings(milvus_uri=settings.milvus_uri, bounded_window_seconds=0)
        assert VectorStore(off, clock).read_level(cat) == "Strong"
        VectorStore(off, clock).upsert_items(cat, [("b", [(vec, (0, 0, 4, 4))], {})])
        assert reader.read_level(cat) == "Strong" and [h.item_id for h in reader.search(cat, vec, 3)] == ["b"]
        gone = WriteClock(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
        assert VectorStore(settings, gone).read_level(cat) == "Strong"
    finally:
        writer.close()
        reader.close()


def test_storage_is_chosen_per_catalog_and_priced_per_object(store, request, tmp_path):
    """Bytes per object with the served shape (a 128-d vector, a detected object's box, a path, a full
    budget of local features): the defaults fit issue 21's budget (<= 1,024 bytes in memory, <= 10,240
    in all); regions cost their 24 x 256 float32 in memory. A catalog keeps its storage: a
    re-embedding's generation inherits it, and asking for another is refused."""
    from visearch import local
    from visearch.store import MAX_REGIONS

    s = VectorStore(StoreSettings(milvus_uri=store.settings.milvus_uri, local_dir=str(tmp_path / "local")))
    meta = ModelMeta(name="embedder", version="2", input_name="images", output_name="embeddings", input_size=320,
                     dim=128)
    rng = np.random.default_rng(3)
    budget = local.BUDGET  # the most bytes of local features an object keeps
    source = "/home/someone/catalogs/grocery-store/dataset/train/Packages/Milk/Arla-Standard-Milk/IMG_0001.jpg"
    try:
        for mode in ("off", "float"):
            cat = f"t_price_{mode}_" + request.node.callspec.id.replace("-", "_")
            gen = s.ensure_catalog(cat, meta, mode)
            assert gen.regions == mode and s.live(cat).regions == mode
            vecs = rng.standard_normal((40, 128)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            items = [(f"item-{n:05d}", [(vecs[2 * n], (0.0, 0.0, 348.0, 348.0)), (vecs[2 * n + 1], (12.5, 40.0, 200.0, 300.0))],
                      {"brand": "Arla"}, source, 1) for n in range(20)]
            s.upsert_local(cat, {f"item-{n:05d}#{k}": bytes(budget) for n in range(20) for k in range(2)})
            s.upsert_items(cat, items)
            if mode == "float":
                feats = rng.random((MAX_REGIONS, 256)).astype(np.float32)
                s.upsert_regions(cat, [(f"item-{n:05d}#{k}", feats, np.tile([0, 0, 10, 10], (MAX_REGIONS, 1)))
                                       for n in range(20) for k in range(2)])
            else:
                with pytest.raises(FailedPrecondition, match="regions off"):
                    s.upsert_regions(cat, [("item-00000#0", np.zeros((1, 256), np.float32), np.zeros((1, 4)))])
            info = {c.name: c for c in s.list_catalogs(footprint=True)}[cat]
            fp = info.footprint
            assert info.objects == 40 and info.regions == mode and fp.sampled == 40
            if mode == "off":
                assert 128 * 4 < fp.memory <= 1024, fp
                assert fp.memory + budget <= fp.total <= 10_240, fp
                lean = fp
            else:
                assert fp.memory >= lean.memory + MAX_REGIONS * 256 * 4, (fp, lean)
                assert fp.total - fp.memory == lean.total - lean.memory  # the same side data
            with pytest.raises(FailedPrecondition, match=f"made with regions {mode}"):
                s.ensure_catalog(cat, meta, "float" if mode == "off" else "off")
            nxt = s.create_generation(cat, ModelMeta(name="embedder", version="3", input_name="images",
                                                     output_name="embeddings", input_size=320, dim=128))
            assert nxt.regions == mode and s.generation(cat, nxt.number).regions == mode
            s.drop_generation(nxt)
    finally:
        s.close()


def test_int8_regions_live_in_files_and_match_as_float_ones(store, request, tmp_path):
    """Regions "int8": one file per object beside the local features (none of it in the vector store's
    memory), int8 with a scale per region; QAM and single-region matching over them find the same
    region with nearly the same score as over the float32 ones, and they follow their items."""
    from visearch import regions
    from visearch.store import MAX_REGIONS, pack_regions, unpack_regions

    rng = np.random.default_rng(7)
    feats = np.abs(rng.normal(size=(MAX_REGIONS, 256))).astype(np.float32) * 40  # sums of cells: not unit
    boxes = rng.uniform(0, 300, size=(MAX_REGIONS, 4)).astype(np.float32)
    boxes[:, 2:] = boxes[:, :2] + 20
    back, bb = unpack_regions(pack_regions(feats, boxes))
    np.testing.assert_array_equal(bb, boxes)
    assert np.abs(back - feats).max() <= np.abs(feats).max(axis=1).max() / 254 + 1e-4
    assert len(pack_regions(feats, boxes)) == 8 + MAX_REGIONS * (4 + 256 + 16)  # 6,632 bytes

    s = VectorStore(StoreSettings(milvus_uri=store.settings.milvus_uri, local_dir=str(tmp_path / "local")))
    try:
        cat = "t_int8_" + request.node.callspec.id.replace("-", "_")
        assert s.ensure_catalog(cat, META, "int8").regions == "int8"
        vecs = unit(rng, 2)
        s.upsert_items(cat, [("a", [(vecs[0], (0, 0, 10, 10))], {}), ("b", [(vecs[1], (0, 0, 10, 10))], {})])
        s.upsert_regions(cat, [("a#0", feats, boxes), ("b#0", feats[:3], boxes[:3])])
        got = s.get_regions(cat, ["a#0", "b#0", "nope#0"])
        assert set(got) == {"a#0", "b#0"} and got["b#0"][0].shape == (3, 256)
        q = feats[2] + feats[5]
        q /= np.linalg.norm(q)
        for method in ("qam", "regions"):
            s_f, box_f = regions.match(method, q, feats, boxes)
            s_q, box_q = regions.match(method, q, *got["a#0"])
            assert s_q == pytest.approx(s_f, abs=5e-3) and np.allclose(box_q, box_f), method
        assert not s.client.has_collection(s.live(cat).region_collection), "nothing in Milvus"
        info = {c.name: c for c in s.list_catalogs(footprint=True)}[cat]
        assert info.footprint.total - info.footprint.memory >= 6_632 / 2  # one of the two has 3 regions
        s.delete_items(cat, ["a"])
        s.upsert_items(cat, [("b", [(vecs[1], (0, 0, 10, 10))], {})])
        assert set(s.get_regions(cat, ["a#0", "b#0"])) == {"b#0"}
        with pytest.raises(FailedPrecondition, match="local dir"):
            store.ensure_catalog(cat + "_nodir", META, "int8")
    finally:
        s.close()


# Ids that sort differently as bytes, as object ids ("a b#0" < "a#0" though "a" < "a b"), or break
# quoting: quotes, backslashes, operators, non-ASCII of every UTF-8 length.
ODD_IDS = ["a", "a b", "a!", "a$", "A", "b", 'x" or item_id != "', "x' or 1 == 1 or '", "\\", "a\\",
           '\\"', "'", "é", "e", "€", "中文", "😀", "\U0010ffff", "\x7f", "\u2028", "\ufeff", "z" * 200]


def test_items_page_in_id_order_across_exact_boundaries(store, request):
    """ListItems's paging: every item exactly once, in Python's (code point) order, whatever the
    ids hold and however pages fall; a page ends on whole items; the last page says so even when it
    is full (4 and 13 divide the 52 items)."""
    from visearch.store import MAX_OBJECTS, VectorStore

    cat = "t_pages_" + request.node.callspec.id.replace("-", "_")
    rng = np.random.default_rng(5)
    ids = ODD_IDS + [f"item-{n:03d}" for n in range(30)]
    sizes = {i: 1 + (n % 3) for n, i in enumerate(ids)} | {"item-007": MAX_OBJECTS}
    store.ensure_catalog(cat, META)
    order = list(rng.permutation(len(ids)))
    for chunk in (order[:20], order[20:]):  # two writes, ids in no order
        store.upsert_items(cat, [(ids[k], [(v, (k, 0, k + 1, 1)) for v in unit(rng, sizes[ids[k]])],
                                  {"n": str(k), "q": 'say "hi"'}) for k in chunk])
    want, n = sorted(ids), len(ids)
    assert len(set(ids)) == n == 52
    # Pages of 1 and 2 read fewer rows (MAX_OBJECTS per item, one item more) than the catalog
    # holds: their range narrows, over ids that come back in no order on Milvus Lite.
    for size in (1, 2, 4, 7, 13, n, 500):
        pages, after = [], ""
        while True:
            items, after = store.list_items(cat, after, size)
            pages.append(items)
            if not after:
                break
        got = [i for page in pages for i, _ in page]
        assert got == want, size
        assert all(len(p) == size for p in pages[:-1]) and 0 < len(pages[-1]) <= size, size
        assert len(pages) == -(-len(want) // size), "no empty page after a full last one"
    items = dict(store.list_items(cat, "", n)[0])
    assert len(items["item-007"]) == MAX_OBJECTS
    for i in ids:
        objs = items[i]
        assert [o.object_id for o in objs] == [f"{i}#{n}" for n in range(sizes[i])]
        assert objs[0].metadata == {"n": str(ids.index(i)), "q": 'say "hi"'} and objs[0].box[0] == ids.index(i)
    # After an id that is not stored, the page starts at the next one; after the last, nothing.
    assert [i for i, _ in store.list_items(cat, "item-0075", 2)[0]] == ["item-008", "item-009"]
    assert store.list_items(cat, want[-1], 5) == ([], "")
    store.delete_items(cat, ["a", "é"])
    assert [i for i, _ in store.list_items(cat, "", n)[0]] == [i for i in want if i not in ("a", "é")]
    # The token is opaque, and only a token ListItems gave is taken.
    for i in ids:
        assert VectorStore.page_after(VectorStore.page_token(i)) == i
    assert VectorStore.page_token("") == "" and VectorStore.page_after("") == ""
    for bad in ("x", "v1.zz", "v1.abc", "v1." + b"a#1".hex(), "v1.ff", "v1." + "61" * 300):
        with pytest.raises(InvalidArgument, match="page_token"):
            VectorStore.page_after(bad)
    with pytest.raises(InvalidArgument, match="page size"):
        store.list_items(cat, "", 501)
    with pytest.raises(NotFound):
        store.list_items("t_no_such_catalog", "", 5)


def test_a_scan_reads_every_row_once_whatever_the_ids_hold(store, request):
    """`scan` (re-embedding's item stamps, backups, the duplicates scan) reads every row exactly once,
    in primary-key order, in batches of any size, ids with quotes and backslashes included (pymilvus's
    query iterator breaks on them); and a backup's rows come back into a restored generation as they were."""
    from visearch.store import VectorStore

    cat = "t_scan_" + request.node.callspec.id.replace("-", "_")
    rng = np.random.default_rng(7)
    ids = ODD_IDS + [f"item-{n:03d}" for n in range(30)]
    store.ensure_catalog(cat, META)
    order = list(rng.permutation(len(ids)))
    for chunk in (order[:25], order[25:]):
        store.upsert_items(cat, [(ids[k], [(v, (k, 0, k + 1, 1)) for v in unit(rng, 1 + k % 3)], {"n": str(k)}, f"/p/{k}", k)
                                 for k in chunk])
    want = sorted(o for k, i in enumerate(ids) for o in VectorStore.object_ids(i)[:1 + k % 3])
    # Batches whose 8x read (a round) is below the ~100 rows narrow their range over many pages; each
    # round on a Milvus server waits for a time tick (Strong reads), so a few sizes are enough.
    for batch in (11, 500):
        got = [r["object_id"] for rows in store.scan(cat, ["item_id"], batch) for r in rows]
        assert got == want, batch
    assert store.item_stamps(cat, batch=16) == {i: k for k, i in enumerate(ids)}
    exported = [r for rows in store.export_rows(cat, 9) for r in rows]
    assert [r["object_id"] for r in exported] == want
    gen = store.restore_generation(cat + "_copy", META, "off")
    assert store.restore_rows(gen, exported) == len(want)
    store.go_live(gen)
    back = [r for rows in store.export_rows(cat + "_copy", 64) for r in rows]
    for a, b in zip(back, exported, strict=True):
        assert a["object_id"] == b["object_id"] and a["vector"].tobytes() == b["vector"].tobytes()
        assert (a["metadata"], a["source"], a["stamp"], tuple(a["box"])) == (b["metadata"], b["source"], b["stamp"],
                                                                              tuple(b["box"]))
    with pytest.raises(AlreadyExists):
        store.restore_generation(cat, META, "off")


def test_index_kind_is_chosen_per_catalog_and_kept(store, request):
    """A catalog's vector index is chosen when it is made (hnsw by default, ivf_sq8 or flat) and read
    back from the collection; searches use that kind's parameters and find what was stored (by key,
    the vectors come back exactly); a re-embedding's generation keeps it; asking an existing catalog
    for another is FAILED_PRECONDITION, an unknown kind INVALID_ARGUMENT; the memory priced per object
    follows the kind (flat: the vector alone, below HNSW's vector and links)."""
    from visearch.store import check_index

    rng = np.random.default_rng(11)
    suffix = request.node.callspec.id.replace("-", "_")
    memory = {}
    for kind in ("hnsw", "ivf_sq8", "flat"):
        cat = f"t_index_{kind}_{suffix}"
        gen = store.ensure_catalog(cat, META, "", "" if kind == "hnsw" else kind)
        assert gen.index == kind
        store._gens.clear()  # read back from the collection's properties, not the cache
        assert store.live(cat).index == kind
        vecs = unit(rng, 300)
        store.upsert_items(cat, [(f"i{n}", [(vecs[n], (0, 0, 10, 10))], {}) for n in range(300)])
        for n in (0, 123, 299):
            assert store.search(cat, vecs[n], 5)[0].item_id == f"i{n}", (kind, n)
        back = store.get_vectors(cat, ["i7#0"])["i7#0"]
        np.testing.assert_allclose(back, vecs[7], atol=1e-6)
        memory[kind] = {c.name: c for c in store.list_catalogs(footprint=True)}[cat].footprint.memory
        assert {c.name: c for c in store.list_catalogs()}[cat].index == kind
        other = "flat" if kind != "flat" else "hnsw"
        with pytest.raises(FailedPrecondition, match=f"made with index {kind}, not {other}"):
            store.ensure_catalog(cat, META, "", other)
        nxt = store.create_generation(cat, ModelMeta(name="embedder", version="2", input_name="", output_name="",
                                                     input_size=32, dim=8))
        assert nxt.index == kind
        store.drop_generation(nxt)
    assert memory["flat"] < memory["hnsw"], memory
    # The kinds differ by their index's bytes a row alone (the same fields); at the served 128-d,
    # IVF_SQ8 (a byte a dimension, no float vector resident) is below flat, which is below HNSW.
    from visearch.store import index_bytes
    for kind in ("hnsw", "ivf_sq8"):
        assert memory[kind] - memory["flat"] == pytest.approx(
            index_bytes(kind, META.dim, store.settings) - index_bytes("flat", META.dim, store.settings), abs=1), memory
    assert index_bytes("ivf_sq8", 128, store.settings) < index_bytes("flat", 128, store.settings) \
        < index_bytes("hnsw", 128, store.settings)
    with pytest.raises(InvalidArgument, match="index 'diskann'"):
        check_index("diskann")
    with pytest.raises(InvalidArgument, match="index 'annoy'"):
        store.ensure_catalog(f"t_index_bad_{suffix}", META, "", "annoy")


def test_pymilvus_logs_through_the_process_logging_without_copies_of_raised_errors(store, caplog):
    """A catalog that does not exist yet is a normal answer (None), not an ERROR with a traceback in
    plain text amid the services' JSON lines; pymilvus's own warnings still reach the process's
    logging (one JSON line each in a service), through no handler of its own."""
    import logging

    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        assert not logging.getLogger(name).handlers and logging.getLogger(name).propagate, name
    with caplog.at_level(logging.WARNING):
        assert store.live("never_made") is None  # describe_collection fails inside pymilvus
        logging.getLogger("pymilvus.client.connection_manager").warning("Connection recovery failed")
    assert not [r for r in caplog.records if "RPC error" in r.getMessage()]
    assert [r.name for r in caplog.records] == ["pymilvus.client.connection_manager"]
