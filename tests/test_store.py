"""The vector store on a real Milvus Lite server."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.errors import FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.settings import StoreSettings
from visearch.store import VectorStore, check_catalog

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
