"""The file format of the trained parameters that come with the repository (`params/`); no torch.

A pack is a compressed .npz of arrays plus a JSON header (format number and the meta record of
what it was made from), and `params/SHA256SUMS` records each pack's sha256: a pack whose file does
not hash to its recorded sum is refused. The embedder's and the detector's trained tensors
(visearch.training.params) and the served embedder's PCA basis (visearch.modeling.reduce) are
packs.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from visearch.checksum import sha256_file as sha256

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"
SUMS = "SHA256SUMS"
FORMAT = 1


class PackError(ValueError):
    """A pack that cannot be used: missing, altered, or made for another recipe or other weights."""


def write_pack(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> str:
    """Writes the pack (atomically) and records its sha256 in SHA256SUMS beside it; returns the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    header = json.dumps({"format": FORMAT, "meta": meta}, sort_keys=True, default=str)
    np.savez_compressed(buf, __header__=np.frombuffer(header.encode(), np.uint8), **arrays)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    digest = sha256(path)
    sums = path.parent / SUMS
    lines = [ln for ln in (sums.read_text().splitlines() if sums.exists() else []) if not ln.endswith(f"  {path.name}")]
    sums.write_text("\n".join(sorted(lines + [f"{digest}  {path.name}"])) + "\n")
    return digest


def read_pack(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and meta record of a pack whose sha256 is the one SHA256SUMS records."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"no pack {path}")
    sums = path.parent / SUMS
    want = {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in (sums.read_text().splitlines() if sums.exists() else [])
            if "  " in ln}
    have = sha256(path)
    if want.get(path.name) != have:
        raise PackError(f"{path} has sha256 {have[:12]}..., {sums} records {str(want.get(path.name))[:12]}...")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("__header__").tobytes().decode())
    if header.get("format") != FORMAT:
        raise PackError(f"{path} is pack format {header.get('format')}, this code reads {FORMAT}")
    return arrays, header["meta"]


def provenance(pack: Path) -> str:
    return f"{Path(pack).name} (sha256 {sha256(pack)})"
