"""Where a local mesh keeps its files, and reading them: its data dir, its state (`mesh.json`: the
components' addresses) and its admin key. Stdlib only, so the SDK (`Client.local`) finds a mesh
without importing the code that runs one (`visearch.mesh`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE = "mesh.json"


def default_data_dir() -> Path:
    env = os.environ.get("VISEARCH_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "visearch"


def load_state(data_dir: Path) -> dict | None:
    path = data_dir / STATE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_admin_key(data_dir: Path) -> str | None:
    path = Path(data_dir) / "secrets" / "admin.key"
    return path.read_text().strip() if path.is_file() else None


def gateway_address(data_dir: Path) -> str | None:
    """The gateway's address of the mesh `visearch up` started in `data_dir`, or None if none is up."""
    state = load_state(Path(data_dir))
    return (state or {}).get("gateway") or None


def api_key(data_dir: Path) -> str:
    """The key a local client calls with: VISEARCH_API_KEY, else the admin key `visearch up` wrote."""
    return os.environ.get("VISEARCH_API_KEY") or read_admin_key(data_dir) or ""
