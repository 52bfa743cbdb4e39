"""Identifiers are data: ids, metadata keys and values of every character class through the store, on
both engines, change exactly their own rows; a store that meets a restarted Milvus heals itself."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import Proc, start_milvus_lite, wait_until
from tests.test_store import META, unit
from visearch import expr
from visearch.errors import InvalidArgument, NotFound
from visearch.mesh import free_port
from visearch.settings import StoreSettings
from visearch.store import ID_MAX, VectorStore, check_filters, check_item_id, check_metadata

# What breaks expressions and parsers: quotes, backslashes, brackets, the id separator, wildcards,
# operators, whitespace and control characters, non-ASCII (2-, 3- and 4-byte UTF-8, line and
# byte-order marks).
SPECIAL = list("'\"\\[](){}#%_*?.,;:=!<>&|^$@`~/ \t\n\r\x00\x01\x1b\x1f\x7f\x85\xa0") + [
    "\u2028", "\ufeff", "é", "€", "中", "😀", "\U0010ffff"]
INJECTIONS = [
    "x' or object_id != '", 'x" or object_id != "', "x'] or object_id not in ['", 'x"] or object_id not in ["',
    "\\' or 1 == 1 or '", '\\" or item_id like "%', "a\\", "\\", "'", '"', "][", '"]["', "'][", "\\u0041",
]
chars = st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8"))
texts = st.one_of(
    st.text(chars, min_size=1, max_size=40),
    st.sampled_from(INJECTIONS),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "€", "😀", "'", "\\"]), st.integers(1, 130)),
)


@pytest.mark.parametrize("value", [*INJECTIONS, "", "plain", "tab\tnl\ncr\r", "é€😀", "\x00\x7f"])
def test_literal_escapes_only_what_both_engines_need(value):
    lit = expr.literal(value)
    assert lit[0] == lit[-1] == '"'
    body = lit[1:-1]
    # Every quote inside is escaped, and no raw line break remains.
    assert "\n" not in body and "\r" not in body
    i = 0
    while i < len(body):
        if body[i] == "\\":
            assert body[i + 1] in '\\"nrt'
            i += 2
        else:
            assert body[i] != '"'
            i += 1
    assert expr.pk_in("object_id", ["a", value]) == f'object_id in ["a", {lit}]'


def test_rules_for_ids_keys_and_values():
    assert check_item_id("é" * 124) and check_item_id("x' or object_id != '")
    for bad in ("", "a#1", "a\nb", "é" * 125, "a" * (ID_MAX - 7)):
        with pytest.raises(InvalidArgument, match="item id"):
            check_item_id(bad)
    assert check_metadata({"brand name": "x' or 1", "é": "\x00"}) == {"brand name": "x' or 1", "é": "\x00"}
    for md, why in (({"a]": "v"}, "brackets"), ({"": "v"}, "empty"), ({"k" * 129: "v"}, "128 bytes"),
                    ({"k": "v" * 2049}, "2048"), ({f"k{i}": "v" for i in range(65)}, "at most 64"),
                    ({f"k{i}": "v" * 2000 for i in range(9)}, "16384")):
        with pytest.raises(InvalidArgument, match=why):
            check_metadata(md, "item")
    with pytest.raises(InvalidArgument, match="filter key"):
        check_filters({'a"]["b': "v"})
    with pytest.raises(InvalidArgument, match="at most 16"):
        check_filters({f"k{i}": "v" for i in range(17)})


@pytest.fixture(scope="module", params=["milvus-lite", "milvus-server"])
def hostile_store(request):
    """One catalog per engine with bystander items that every example must leave untouched."""
    uri = request.getfixturevalue("milvus_uri" if request.param == "milvus-lite" else "milvus_server_uri")
    s = VectorStore(StoreSettings(milvus_uri=uri))
    cat = "t_hostile_" + request.param.replace("-", "_")
    s.ensure_catalog(cat, META, "float")
    vecs = unit(np.random.default_rng(5), 4)
    bystanders = {f"keep{n}": v for n, v in enumerate(vecs)}
    s.upsert_items(cat, [(i, [(v, (0, 0, 4, 4)), (v, (1, 1, 2, 2))], {"k": i, "shared": "yes"})
                         for i, v in bystanders.items()])
    s.upsert_regions(cat, [(f"{i}#0", np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32)) for i in bystanders])
    yield s, cat, bystanders
    s.close()


def catalog_state(s: VectorStore, cat: str, ids) -> dict:
    rows = s.item_rows(cat, list(ids))
    return {i: [(o.object_id, o.box, o.metadata) for o in objs] for i, objs in rows.items()}


@pytest.mark.integration
def test_hostile_ids_keys_and_values_touch_only_their_own_rows(hostile_store):
    # Each example costs a few Milvus round trips: ~0.1 s on Milvus Lite, ~5 s on the server (Strong
    # reads wait for its time tick), so the server sees fewer of them.
    s, cat, bystanders = hostile_store
    n = 80 if "lite" in cat else 12
    given(item_id=texts, key=texts, value=texts)(settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
        lambda item_id, key, value: one_hostile_item(s, cat, bystanders, item_id, key, value)))()


def one_hostile_item(s: VectorStore, cat: str, bystanders: dict, item_id: str, key: str, value: str) -> None:
    try:
        check_item_id(item_id)
    except InvalidArgument:
        assume(False)  # refused with a reason (tested above); nothing else to check
    metadata = {"k": value}
    if expr.key_problem(key) is None and key != "k":
        metadata[key] = "hostile"
    check_metadata(metadata)
    before = catalog_state(s, cat, bystanders)
    assert len(before) == len(bystanders)
    vec = unit(np.random.default_rng(abs(hash(item_id)) % 2**32))[0]
    s.upsert_items(cat, [(item_id, [(vec, (0, 0, 8, 8)), (vec, (0, 0, 2, 2))], metadata, "/src/" + item_id[:100])])
    s.upsert_regions(cat, [(f"{item_id}#0", np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32))])
    try:
        # Read back exactly, by primary key.
        objs = s.get_item(cat, item_id)
        assert [o.object_id for o in objs] == [f"{item_id}#0", f"{item_id}#1"]
        assert objs[0].item_id == item_id and objs[0].metadata == metadata
        assert objs[0].source == "/src/" + item_id[:100]
        assert set(s.get_vectors(cat, [f"{item_id}#0", "keep0#0"])) == {f"{item_id}#0", "keep0#0"}
        assert set(s.get_regions(cat, [f"{item_id}#0"])) == {f"{item_id}#0"}
        # Filters match the value (and the key) exactly: this item, nothing else.
        assert {h.item_id for h in s.search(cat, vec, 20, {"k": value})} == {item_id}
        if key in metadata:
            assert {h.item_id for h in s.search(cat, vec, 20, {key: "hostile"})} == {item_id}
        assert {h.item_id for h in s.search(cat, vec, 20, {"shared": "yes"})} == set(bystanders)
        # Re-ingesting with one object drops exactly its second row.
        s.upsert_items(cat, [(item_id, [(vec, (0, 0, 8, 8))], metadata)])
        assert [o.object_id for o in s.get_item(cat, item_id)] == [f"{item_id}#0"]
        assert catalog_state(s, cat, bystanders) == before
    finally:
        assert s.delete_items(cat, [item_id]) == 1
    with pytest.raises(NotFound):
        s.get_item(cat, item_id)
    assert s.get_regions(cat, [f"{item_id}#0"]) == {}
    assert catalog_state(s, cat, bystanders) == before, "nothing else in the catalog changed"
    assert s.delete_items(cat, [item_id, "x' or object_id != '"]) == 0


@pytest.mark.integration
def test_a_running_store_heals_after_milvus_lite_restarts(tmp_path):
    """The same VectorStore object (a running gateway's or worker's) across a kill -9 and restart of
    Milvus Lite: the collections come back released, and the next reads load them again."""

    def start(port: int) -> Proc:
        return start_milvus_lite(tmp_path / "data", port, tmp_path / f"log{port}-{len(list(tmp_path.iterdir()))}")

    port = free_port()
    proc = start(port)
    vecs = unit(np.random.default_rng(4), 3)
    s = VectorStore(StoreSettings(milvus_uri=f"http://127.0.0.1:{port}"))
    try:
        s.ensure_catalog("healing", META, "float")
        s.upsert_items("healing", [("a", [(vecs[0], (0, 0, 1, 1))], {}), ("b", [(vecs[1], (0, 0, 1, 1))], {})])
        s.upsert_regions("healing", [("a#0", np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32))])
        s.flush("healing")
        assert s.search("healing", vecs[1], 1)[0].item_id == "b"
        proc.p.kill()
        proc.stop()
        proc = start(port)
        wait_until(lambda: s.ping(), 30, "the store's client reconnecting")
        assert s.search("healing", vecs[1], 1)[0].item_id == "b"
        assert [o.object_id for o in s.get_item("healing", "a")] == ["a#0"]
        assert list(s.get_regions("healing", ["a#0"])) == ["a#0"]
        assert s.count("healing") == 2
        s.upsert_items("healing", [("c", [(vecs[2], (0, 0, 1, 1))], {})])
        assert s.search("healing", vecs[2], 1)[0].item_id == "c"
    finally:
        s.close()
        proc.stop()
