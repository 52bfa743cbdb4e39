"""Catalog backup and restore: the records a catalog is exported as, and the folder a backup is.

The gateway streams a catalog out (ExportCatalog: a header, batches of objects, a trailer) and in
(ImportCatalog: the same records); nothing is embedded again. Each stored object travels as it is
stored: its vector as float32 bytes (exact), box, metadata, source, stamp, local features in their
compact form, and base regions when the catalog keeps them.

A backup folder (`visearch backup --catalog C --out DIR`):
  manifest.json       format, catalog, model (name, version, dim, weights_sha256), storage,
                      counts, when, and every data file with its bytes, record count and sha256
  records-00000.bin   the stream's records in order (the header first, the trailer last), each a
                      4-byte little-endian length and a serialised CatalogRecord; a file is closed
                      at about FILE_BYTES and the next one begun
`visearch restore DIR --catalog C2` checks every file's sha256 and the record counts before it sends
anything, so a damaged backup is refused whole, and the gateway refuses a model version its
repository lacks (the vectors would mean nothing to another model).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from visearch.common.v1 import common_pb2
from visearch.gateway.v1 import gateway_pb2

FORMAT = "visearch-catalog/1"
MANIFEST = "manifest.json"
FILE_BYTES = 256 * 1024 * 1024
DEFAULT_BATCH = 128
MAX_BATCH = 1024
_LEN = struct.Struct("<I")


class BackupError(Exception):
    """A backup folder that cannot be restored: missing, damaged or of another format (one line says why)."""


# ---- rows <-> records (the gateway) ----------------------------------------------
def record_of(row: dict) -> gateway_pb2.ObjectRecord:
    """An exported row (visearch.store.VectorStore.export_rows) as its record."""
    box = row.get("box") or (0, 0, 0, 0)
    rec = gateway_pb2.ObjectRecord(
        object_id=row["object_id"], item_id=row["item_id"], vector=np.asarray(row["vector"], "<f4").tobytes(),
        box=common_pb2.BoundingBox(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
        metadata={str(k): str(v) for k, v in (row.get("metadata") or {}).items()}, source=row.get("source") or "",
        stamp=int(row.get("stamp") or 0), local_features=row.get("local") or b"")
    if row.get("regions") is not None:
        feats, boxes = row["regions"]
        rec.region_count = len(feats)
        rec.region_features = np.asarray(feats, "<f4").tobytes()
        rec.region_boxes = np.asarray(boxes, "<f4").tobytes()
    return rec


def row_of(rec: gateway_pb2.ObjectRecord) -> dict:
    """A record as the row VectorStore.restore_rows writes (ValueError when its arrays do not fit)."""
    if len(rec.vector) % 4:
        raise ValueError(f"object {rec.object_id[:80]!r}: its vector is not float32 bytes")
    regions = None
    if rec.region_count:
        n = rec.region_count
        feats = np.frombuffer(rec.region_features, "<f4")
        boxes = np.frombuffer(rec.region_boxes, "<f4")
        if len(boxes) != 4 * n or not len(feats) or len(feats) % n:
            raise ValueError(f"object {rec.object_id[:80]!r}: {n} regions do not fit their arrays")
        regions = (feats.reshape(n, -1).astype(np.float32), boxes.reshape(n, 4).astype(np.float32))
    b = rec.box
    return {"object_id": rec.object_id, "item_id": rec.item_id, "vector": np.frombuffer(rec.vector, "<f4"),
            "box": (b.x1, b.y1, b.x2, b.y2), "metadata": dict(rec.metadata), "source": rec.source,
            "stamp": rec.stamp, "local": rec.local_features or None, "regions": regions}


# ---- the folder (the CLI) -----------------------------------------------------------
def write(records: Iterable[gateway_pb2.CatalogRecord], out: Path,
          progress: Callable[[int, int], None] | None = None, file_bytes: int = FILE_BYTES) -> dict:
    """Write a stream of records as a backup folder (`out` must be empty or new); returns the manifest.
    Written under a temporary name and renamed when complete, so a folder with a manifest is whole."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} is not an empty folder: choose a new folder for the backup")
    files: list[dict] = []
    header, trailer, objects, items = None, None, 0, set()
    f, digest, size, count = None, None, 0, 0

    def close():
        nonlocal f
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[-1].update(bytes=size, records=count, sha256=digest.hexdigest())
            f = None

    for rec in records:
        kind = rec.WhichOneof("record")
        if header is None and kind != "header":
            raise BackupError("the gateway's stream did not begin with a catalog header")
        if kind == "header":
            header = rec.header
        elif kind == "trailer":
            trailer = rec.trailer
        else:
            objects += len(rec.batch.objects)
            items.update(o.item_id for o in rec.batch.objects)
        if f is None or size >= file_bytes:
            close()
            out.mkdir(parents=True, exist_ok=True)  # once the gateway answered: a refused export leaves no folder
            files.append({"name": f"records-{len(files):05d}.bin"})
            f, digest, size, count = open(out / files[-1]["name"], "wb"), hashlib.sha256(), 0, 0
        data = rec.SerializeToString()
        for chunk in (_LEN.pack(len(data)), data):
            f.write(chunk)
            digest.update(chunk)
        size += _LEN.size + len(data)
        count += 1
        if progress and kind == "batch":
            progress(objects, header.objects)
    close()
    if header is None or trailer is None:
        raise BackupError("the export stream ended early (no trailer): the backup is incomplete")
    if trailer.objects != objects:
        raise BackupError(f"the export sent {objects} objects but says {trailer.objects}: the backup is incomplete")
    model = header.model
    manifest = {
        "format": FORMAT, "catalog": header.catalog, "generation": header.generation,
        "model": {"name": model.name, "version": model.version, "dim": model.dim,
                  "weights_sha256": model.weights_sha256},
        "storage": {"regions": header.storage.regions, "index": header.storage.index or "hnsw"},
        "objects": objects, "items": len(items),
        "exported_at": header.exported_at, "written_at": time.time(), "files": files,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"{folder} holds no {MANIFEST}: not a visearch backup, or one not completed") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: format {manifest.get('format')!r}, this visearch reads {FORMAT!r}")
    return manifest


def verify(folder: Path) -> dict:
    """The manifest, once every data file is there with its recorded size and sha256."""
    manifest = read_manifest(folder)
    for entry in manifest["files"]:
        path = Path(folder) / entry["name"]
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
        if digest.hexdigest() != entry["sha256"]:
            raise BackupError(f"{path} does not match its sha256 in {MANIFEST}: the backup is damaged")
    return manifest


def records(folder: Path, manifest: dict, catalog: str) -> Iterator[gateway_pb2.CatalogRecord]:
    """The backup's records in order, the header's catalog set to `catalog` (the restore's name)."""
    first = True
    for entry in manifest["files"]:
        with open(Path(folder) / entry["name"], "rb") as f:
            for _ in range(entry["records"]):
                head = f.read(_LEN.size)
                (n,) = _LEN.unpack(head)
                rec = gateway_pb2.CatalogRecord.FromString(f.read(n))
                if first:
                    if rec.WhichOneof("record") != "header":
                        raise BackupError(f"{entry['name']} does not begin with the catalog header")
                    rec.header.catalog = catalog
                    first = False
                yield rec
