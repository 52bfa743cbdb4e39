"""The mesh's Milvus Lite server (visearch.liteserver): concurrent writers lose nothing to a kill -9.

Milvus Lite 3.2's own server runs concurrent writes to one collection unserialised: two upserts
take the same sequence numbers and interleave their log records, and recovery after a kill -9
keeps only a readable prefix (four writers as below: 64, 0 and 64 of 2,560 items survived in three
runs of the plain `python -m milvus_lite server`). That lost a batch in the mesh's kill-everything
test (tests/test_reliability.py)."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from tests.conftest import free_port, start_milvus_lite
from visearch import liteserver
from visearch.inference import ModelMeta
from visearch.settings import StoreSettings
from visearch.store import VectorStore, milvus_client

pytestmark = pytest.mark.integration

META = ModelMeta("m", "1", "input", "embedding", 224, 32)


def stored(uri: str, catalog: str, ids: list[str]) -> set[str]:
    store = VectorStore(StoreSettings(milvus_uri=uri))
    try:
        return {i for k in range(0, len(ids), 500) for i in store.item_rows(catalog, ids[k:k + 500])}
    finally:
        store.close()


def test_concurrent_writers_lose_nothing_to_a_kill(tmp_path):
    """Four writers upsert batches of 16 two-object items at once (as the mesh's worker processes
    do), nothing flushes, Milvus Lite is killed with SIGKILL and started again on its folder:
    every item each writer was told was stored is there, with both its objects."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log1")
    try:
        VectorStore(StoreSettings(milvus_uri=uri)).ensure_catalog("conc", META)
        acked: list[str] = []
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            rng = np.random.default_rng(w)
            store = VectorStore(StoreSettings(milvus_uri=uri))
            try:
                for b in range(20):
                    items = [(f"w{w}-{b:02d}-{i:02d}", [(rng.standard_normal(32).astype(np.float32), (0, 0, 1, 1))
                                                        for _ in range(2)], {"w": str(w)}) for i in range(16)]
                    store.upsert_items("conc", items)
                    acked.extend(i[0] for i in items)
            except BaseException as e:  # noqa: BLE001 - reported by the test below
                errors.append(e)
            finally:
                store.close()

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(acked) == 4 * 20 * 16
        os.killpg(proc.p.pid, signal.SIGKILL)
        proc.p.wait()
    finally:
        proc.stop()
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log2")
    try:
        have = stored(uri, "conc", acked)
        assert len(have) == len(acked), f"{len(acked) - len(have)} of {len(acked)} acknowledged items lost"
        store = VectorStore(StoreSettings(milvus_uri=uri))
        rows = store.item_rows("conc", acked[:64])
        store.close()
        assert all(len(objs) == 2 for objs in rows.values())
    finally:
        proc.stop()


def test_reads_never_miss_an_acknowledged_write(tmp_path):
    """A search or query sees every row whose write was acknowledged before it started, also while
    the server flushes: Milvus Lite's flush takes the rows out of the memtable before their segment
    is in place, and a read between the two missed them (the last 8-12 items in 5 of 1,086 queries,
    with writes alone serialised). Reads are held back while a write runs."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log1")
    try:
        store = VectorStore(StoreSettings(milvus_uri=uri))
        gen = store.ensure_catalog("rw", META)
        acked: list[str] = []
        stop = threading.Event()
        misses: list[tuple[int, int]] = []
        queries = []

        def reader() -> None:
            client = milvus_client(uri)
            while not stop.is_set():
                want = set(acked)
                rows = client.query(gen.collection, filter='object_id != ""', output_fields=["item_id"], limit=16000)
                queries.append(1)
                missed = want - {r["item_id"] for r in rows}
                if missed:
                    misses.append((len(want), len(missed)))
            client.close()

        t = threading.Thread(target=reader)
        t.start()
        rng = np.random.default_rng(0)
        try:
            for b in range(150):
                items = [(f"b{b:03d}-{i}", [(rng.standard_normal(32).astype(np.float32), (0, 0, 1, 1))], {})
                         for i in range(4)]
                store.upsert_items(gen, items)
                acked.extend(i[0] for i in items)
                store.flush(gen)
        finally:
            stop.set()
            t.join()
        store.close()
        assert len(queries) > 50, "the reader ran alongside the writes"
        assert not misses, f"{len(misses)} of {len(queries)} reads missed acknowledged items: {misses[:5]}"
    finally:
        proc.stop()


def test_sigterm_closes_the_data_cleanly(tmp_path):
    """SIGTERM: the server drains, closes the database (the write-ahead log flushed into segments and
    removed) and exits 0; the rows are there after a start on the same folder."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log1")
    store = VectorStore(StoreSettings(milvus_uri=uri))
    store.ensure_catalog("kept", META)
    vecs = np.eye(32, dtype=np.float32)
    store.upsert_items("kept", [(f"i{n}", [(vecs[n], (0, 0, 1, 1))], {}) for n in range(8)])
    store.close()
    assert proc.stop() == 0
    assert "stopped" in proc.log.read_text()
    wal = [p for p in (tmp_path / "data").rglob("wal_*") if p.is_file()]
    assert not wal, f"write-ahead logs left after a clean stop: {wal}"
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log2")
    try:
        assert stored(uri, "kept", [f"i{n}" for n in range(8)]) == {f"i{n}" for n in range(8)}
    finally:
        proc.stop()


def test_a_busy_folder_is_one_line(tmp_path):
    """A second server on a folder another one holds says so in one line and exits 1."""
    import subprocess

    port = free_port()
    proc = start_milvus_lite(tmp_path / "data", port, tmp_path / "log1")
    try:
        out = subprocess.run(liteserver.argv(tmp_path / "data", free_port()), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "cannot open" in lines[0], out.stderr
    finally:
        proc.stop()
