"""The model repository on disk: `<repo>/<name>/config.pbtxt` and `<repo>/<name>/<version>/{model.onnx,meta.json}`.

The layout Triton serves and the embedded backend reads alike (docs/MODELS.md). Here: a model's
built versions, the next free one, its config.pbtxt (read, written), and atomic file writes (a
temporary file beside the target, then a rename: a server never sees half a file). No torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from visearch.pbtxt import parse_pbtxt

from .atomic import write_atomic
from .record import META_FILE, ModelRecord

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


class ConfigMismatch(ValueError):
    """The committed Triton config does not describe the built model."""


def model_dir(repo: Path, name: str) -> Path:
    return Path(repo) / name


def version_dir(repo: Path, name: str, version: int | str) -> Path:
    return Path(repo) / name / str(version)


def config_path(repo: Path, name: str) -> Path:
    return Path(repo) / name / CONFIG_FILE


def versions(model_folder: Path) -> list[int]:
    """The built versions of the model in `model_folder` (integer folders holding a model.onnx), ascending."""
    model_folder = Path(model_folder)
    if not model_folder.is_dir():
        return []
    return sorted(int(p.name) for p in model_folder.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file())


def adapted_to(version_folder: Path) -> str | None:
    """The catalog a version was adapted to (its meta record's `adaptation`), None for a general version.

    An adapted version (visearch/adapting.py) serves one catalog: it is never the model's default."""
    try:
        data = json.loads((Path(version_folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    adaptation = data.get("adaptation") if isinstance(data, dict) else None
    return str(adaptation.get("catalog", "")) if isinstance(adaptation, dict) else None


def general_versions(model_folder: Path) -> list[int]:
    """The built versions that any catalog may use (not adapted to one catalog), ascending: the
    default served version is the highest of these."""
    return [v for v in versions(model_folder) if adapted_to(Path(model_folder) / str(v)) is None]


def next_version(repo: Path, name: str) -> int:
    """One above the highest built version of `name` (1 when it has none)."""
    return max(versions(model_dir(repo, name)), default=0) + 1


def read_record(repo: Path, name: str, version: int | str) -> ModelRecord:
    """The meta record of `<repo>/<name>/<version>` (strict: `ModelRecord.read`)."""
    return ModelRecord.read(version_dir(repo, name, version) / META_FILE)


def read_config(path: Path) -> dict:
    """A config.pbtxt parsed (`visearch.pbtxt.parse_pbtxt`: fields map to lists of values)."""
    return parse_pbtxt(Path(path).read_text(encoding="utf-8"))


def write_config(path: Path, text: str) -> Path:
    """Write a config.pbtxt (atomically), making its model folder when needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text)
