"""Where each stored object's local features live: files on disk, read by key for a search's top
candidates only, so they never take the memory the vector index needs.

One file per object (the compact form of visearch.local.Features, at most local.BUDGET bytes),
under `<root>/<collection>/<h[:2]>/<h>` with h = sha256 of the object id (ids are data: any
character, any length). The collection is the catalog generation's, so a re-embedding builds
its own set beside the live one and retiring a generation drops its folder. Writes are atomic
(a temporary file renamed), so a reader never sees half a file and a re-run task writes the same
bytes again. The folder is the blob store's sibling: shared by the workers (writers) and the
re-rank service (reader), a ReadWriteMany volume in production.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from visearch import files


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, collection: str, object_id: str) -> Path:
        h = hashlib.sha256(object_id.encode()).hexdigest()
        return self.root / collection / h[:2] / h

    def put_many(self, collection: str, rows: dict[str, bytes]) -> None:
        for object_id, data in rows.items():
            path = self.path(collection, object_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def get_many(self, collection: str, object_ids: list[str], max_bytes: int = 1 << 16) -> dict[str, bytes]:
        """object id -> its features, for those stored (a missing or unreadable file is left out: the
        candidate keeps its global score)."""
        out = {}
        for object_id in object_ids:
            try:
                out[object_id] = files.read_file(self.path(collection, object_id), max_bytes)
            except files.ReadError:
                continue
        return out

    def delete(self, collection: str, object_ids: list[str]) -> None:
        for object_id in object_ids:
            self.path(collection, object_id).unlink(missing_ok=True)

    def drop(self, collection: str) -> None:
        shutil.rmtree(self.root / collection, ignore_errors=True)

    def count(self, collection: str) -> int:
        return sum(1 for _ in (self.root / collection).glob("*/*")) if (self.root / collection).is_dir() else 0

    def sizes(self, collection: str, object_ids: list[str]) -> list[int]:
        """The stored size in bytes of each object's features (0: none stored)."""
        out = []
        for object_id in object_ids:
            try:
                out.append(self.path(collection, object_id).stat().st_size)
            except OSError:
                out.append(0)
        return out

    def bytes_used(self, collection: str) -> int:
        d = self.root / collection
        return sum(p.stat().st_size for p in d.glob("*/*")) if d.is_dir() else 0
