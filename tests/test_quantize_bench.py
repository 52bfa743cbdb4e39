"""bench/quantize.py on a few photos: the int8 model is made, loads, and stays close to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_quantize_benchmark_smoke(tmp_path, model_repo):
    import onnxruntime as ort

    from bench.quantize import main
    from visearch.datasets import grocery_root, grocery_split
    from visearch.offline import load_batch

    assert main(["--model", str(model_repo), "--calibration", "8", "--limit", "3", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["size_mb"]["int8"] < 0.5 * r["size_mb"]["fp32"], r["size_mb"]
    assert set(r["accuracy"]["int8"]) == {"P1", "P3"} and all(r["speed"][k]["batch1_ms_per_image"] > 0 for k in r["speed"])
    meta = json.loads((tmp_path / "int8" / "meta.json").read_text())
    source = json.loads((Path(r["model"]).parent / "meta.json").read_text())
    assert meta["id"] == source["id"] + "-int8" and meta["dim"] == source["dim"]
    # The int8 descriptors stay where the fp32 ones are: each photo's int8 vector is closest to its
    # own fp32 vector among photos of different products (a weak check: 8 calibration photos only).
    val = grocery_split(grocery_root(), "val")
    x = load_batch([p.path for p in val[:: len(val) // 6][:6]], meta["input_size"])
    outs = []
    for path in (r["model"], r["int8_model"]):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        v = s.run([s.get_outputs()[0].name], {s.get_inputs()[0].name: x})[0]
        outs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    sim = outs[1] @ outs[0].T
    assert (sim.argmax(axis=1) == np.arange(len(x))).all(), sim
