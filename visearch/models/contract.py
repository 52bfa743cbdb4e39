"""The embedder's served contract, without torch: its graph's names, the build's choices
(`EmbedderConfig`), and the Triton config (`config.pbtxt`) that must describe it.

`visearch models build` (`python -m visearch.building`) and `visearch export` write or check the config with
`render_config` / `check_config` before they replace any model file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .repository import ConfigMismatch, read_config

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OPSET = 17
MAX_BATCH = 32
PARITY_TOL = 1e-4
INPUT_FORMAT = "NHWC uint8 RGB, plain bilinear resize to SxS"


@dataclass(frozen=True)
class EmbedderConfig:
    arch: str = "efficientnet_lite0"
    pooling: str = "rmac"
    size: int = 320
    gem_p: float = 3.0
    rmac_levels: int = 3
    name: str = "embedder"
    version: int = 1

    @property
    def id(self) -> str:
        """Short identity of what the vectors mean; vectors of different ids don't mix."""
        pool = f"gem{self.gem_p:g}" if self.pooling == "gem" else (
            f"rmac{self.rmac_levels}" if self.pooling == "rmac" else self.pooling)
        return f"{self.arch}-{pool}-{self.size}"


DEFAULT_CONFIG = EmbedderConfig()


def output_specs(dim: int, regions: dict | None = None) -> list[tuple[str, list[int]]]:
    """(name, dims without the batch axis) of every output the embedder graph has."""
    out = [(OUTPUT_NAME, [dim])]
    if regions:
        h, w = regions["map_size"]
        out += [("region_map", [h, w, regions["dim"]]), ("region_energy", [h, w, regions["channels"]]),
                ("region_query", [regions["dim"]])]
    return out


def render_config(cfg: EmbedderConfig, dim: int, regions: dict | None = None) -> str:
    s = cfg.size
    outputs = ",\n".join(f"""  {{
    name: "{name}"
    data_type: TYPE_FP32
    dims: [ {", ".join(str(d) for d in dims)} ]
  }}""" for name, dims in output_specs(dim, regions))
    return f"""# Triton model configuration of the visearch embedder ({cfg.id}).
# Must agree with embedder/{cfg.version}/model.onnx: `visearch models build` checks it.
name: "{cfg.name}"
backend: "onnxruntime"
max_batch_size: {MAX_BATCH}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {s}, {s}, 3 ]
  }}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
# The two newest versions stay loaded: a catalog is searched with the version that made its
# vectors, so a new model is deployed beside the old one (docs/MODELS.md, model versions).
version_policy: {{ latest: {{ num_versions: 2 }} }}
"""


def check_config(path: Path, cfg: EmbedderConfig, dim: int, regions: dict | None = None) -> None:
    """Raise ConfigMismatch unless `path` serves `cfg` (names, types, dims, backend, every output)."""
    conf = read_config(path)
    want_in = [cfg.size, cfg.size, 3]
    problems: list[str] = []

    def one(field: str):
        return conf.get(field, [None])[0]

    if one("name") != cfg.name:
        problems.append(f"name is {one('name')!r}, expected {cfg.name!r}")
    if one("backend") != "onnxruntime" and one("platform") != "onnxruntime_onnx":
        problems.append("backend must be \"onnxruntime\"")
    if not isinstance(one("max_batch_size"), int) or one("max_batch_size") < 1:
        problems.append("max_batch_size must be >= 1 (the model has a dynamic batch axis and dims exclude it)")
    entries = conf.get("input", [])
    if len(entries) != 1:
        problems.append(f"expected exactly one input, found {len(entries)}")
    else:
        e = entries[0]
        got = (e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", []))
        if got != (INPUT_NAME, "TYPE_UINT8", want_in):
            problems.append(f"input is name={got[0]!r} data_type={got[1]} dims={got[2]}, "
                            f"the model has name={INPUT_NAME!r} data_type=TYPE_UINT8 dims={want_in}")
    have = [(e.get("name", [None])[0], e.get("data_type", [None])[0], e.get("dims", [])) for e in conf.get("output", [])]
    # [-1]: the model's versions differ in dimension (a reduced version beside its source,
    # visearch.modeling.reduce); each version's meta.json says its own.
    have = sorted((n, t, [dim] if n == OUTPUT_NAME and d == [-1] else d) for n, t, d in have)
    want = sorted((name, "TYPE_FP32", dims) for name, dims in output_specs(dim, regions))
    if have != want:
        problems.append(f"outputs are {have}, the model has {want}")
    if problems:
        raise ConfigMismatch(
            f"{path} does not match the model being built ({cfg.id}): " + "; ".join(problems)
            + ". Fix the config (or pass --write-config to regenerate it), or build the config's model.")
