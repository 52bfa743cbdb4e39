"""The backup folder and the records a catalog travels as (visearch.backup); the whole path through a
mesh (backup -> restore -> the same answers) is tests/test_mesh.py::test_backup_and_restore_answer_every_query_the_same."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visearch import backup
from visearch.common.v1 import common_pb2
from visearch.gateway.v1 import gateway_pb2


def rows(n: int, dim: int = 8, regions: bool = True, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = rng.normal(size=dim).astype(np.float32)
        out.append({"object_id": f"item é{i // 2}#{i % 2}", "item_id": f"item é{i // 2}", "vector": v / np.linalg.norm(v),
                    "box": (1.5, 2.0, 30.25, 40.0), "metadata": {"brand": "Arla", "n": str(i)},
                    "source": f"/photos/{i}.jpg", "stamp": 1_700_000_000_000_000_000 + i,
                    "local": bytes(rng.integers(0, 256, 36 * 5 + 4, dtype=np.uint8)) if i % 3 else None,
                    "regions": (rng.normal(size=(3, 4)).astype(np.float32), rng.uniform(0, 50, (3, 4)).astype(np.float32))
                    if regions else None})
    return out


def stream(objects: list[dict], batch: int = 4, trailer: bool = True):
    model = common_pb2.ModelInfo(name="embedder", version="2", dim=8, weights_sha256="ab" * 32)
    yield gateway_pb2.CatalogRecord(header=gateway_pb2.CatalogHeader(
        catalog="shop", model=model, storage=gateway_pb2.CatalogStorage(regions="int8"), objects=len(objects),
        generation=3, exported_at=1.0, format=backup.FORMAT))
    for i in range(0, len(objects), batch):
        yield gateway_pb2.CatalogRecord(batch=gateway_pb2.ObjectBatch(
            objects=[backup.record_of(r) for r in objects[i:i + batch]]))
    if trailer:
        items = {r["item_id"] for r in objects}
        yield gateway_pb2.CatalogRecord(trailer=gateway_pb2.CatalogTrailer(objects=len(objects), items=len(items)))


def same_row(a: dict, b: dict) -> None:
    assert a["object_id"] == b["object_id"] and a["item_id"] == b["item_id"]
    assert a["vector"].tobytes() == np.asarray(b["vector"], np.float32).tobytes()  # exact, not rounded
    assert tuple(a["box"]) == tuple(b["box"]) and a["metadata"] == b["metadata"]
    assert a["source"] == b["source"] and a["stamp"] == b["stamp"] and a["local"] == b["local"]
    if b["regions"] is None:
        assert a["regions"] is None
    else:
        assert all(np.array_equal(x, y) for x, y in zip(a["regions"], b["regions"], strict=True))


def test_a_row_travels_exactly():
    for r in rows(5) + rows(2, regions=False):
        same_row(backup.row_of(backup.record_of(r)), r)


def test_a_record_whose_arrays_do_not_fit_is_refused():
    rec = backup.record_of(rows(1)[0])
    rec.region_count = 5
    with pytest.raises(ValueError, match="regions do not fit"):
        backup.row_of(rec)
    rec = backup.record_of(rows(1)[0])
    rec.vector = rec.vector[:-1]
    with pytest.raises(ValueError, match="float32"):
        backup.row_of(rec)


def test_a_folder_round_trip_across_files(tmp_path):
    objects = rows(23)
    seen = []
    manifest = backup.write(stream(objects), tmp_path / "b", progress=lambda done, total: seen.append((done, total)),
                            file_bytes=2048)
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(manifest["files"]) > 1 and files == ["manifest.json", *[f["name"] for f in manifest["files"]]]
    assert manifest["objects"] == 23 and manifest["items"] == 12 and manifest["catalog"] == "shop"
    assert manifest["model"] == {"name": "embedder", "version": "2", "dim": 8, "weights_sha256": "ab" * 32}
    assert manifest["storage"] == {"regions": "int8", "index": "hnsw"} and seen[-1] == (23, 23)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text()) == manifest
    recs = list(backup.records(tmp_path / "b", backup.verify(tmp_path / "b"), "restored"))
    assert recs[0].header.catalog == "restored" and recs[0].header.model.version == "2"
    assert recs[-1].WhichOneof("record") == "trailer" and recs[-1].trailer.objects == 23
    back = [backup.row_of(o) for r in recs[1:-1] for o in r.batch.objects]
    assert len(back) == 23
    for a, b in zip(back, objects, strict=True):
        same_row(a, b)


def test_a_damaged_or_partial_backup_is_refused(tmp_path):
    backup.write(stream(rows(9)), tmp_path / "b")
    data = tmp_path / "b" / "records-00000.bin"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 1
    data.write_bytes(bytes(blob))
    with pytest.raises(backup.BackupError, match="damaged"):
        backup.verify(tmp_path / "b")
    data.unlink()
    with pytest.raises(backup.BackupError, match="cannot read"):
        backup.verify(tmp_path / "b")
    with pytest.raises(backup.BackupError, match="no manifest.json"):
        backup.verify(tmp_path)
    # A stream that ends before its trailer leaves no manifest: the folder is not a backup.
    with pytest.raises(backup.BackupError, match="ended early"):
        backup.write(stream(rows(9), trailer=False), tmp_path / "cut")
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(backup.BackupError, match="not an empty folder"):
        backup.write(stream(rows(2)), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format"] = "visearch-catalog/0"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(backup.BackupError, match="format"):
        backup.read_manifest(tmp_path / "b")
