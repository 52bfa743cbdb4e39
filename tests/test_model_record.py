"""The model record (meta.json schema) and the model repository: no torch needed."""

from __future__ import annotations

import json
import sys

import pytest

from visearch.models import ModelRecord
from visearch.models.repository import next_version, versions

BASE = {"name": "embedder", "version": 1, "id": "x", "architecture": "a", "input_name": "images",
        "input_size": 32, "output_name": "embeddings", "dim": 8}


def test_the_model_layer_imports_no_torch():
    import subprocess
    code = "import sys, visearch.models.record, visearch.models.repository, visearch.models.contract; " \
           "sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_record_round_trips_keeping_key_order_and_nulls(tmp_path):
    data = dict(BASE, regions=None, whitening={"in": 8}, model_sha256="ab")
    rec = ModelRecord.from_dict(data)
    path = rec.write(tmp_path)
    assert path.read_text() == json.dumps(data, indent=2) + "\n"
    again = ModelRecord.read(tmp_path)
    assert again == rec and list(again.to_dict()) == list(data) and again.regions is None and "regions" in again
    assert again.pca is None and "pca" not in again
    new = again.derive(version=2, reduction={"dim": 4})
    assert list(new.to_dict()) == [*data, "reduction"] and new.version == 2


@pytest.mark.parametrize("change, match", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"dim": None}, "'dim' is NoneType"),
    ({"input_size": [320, 320]}, "'input_size' is list"),
    ({"pooling": {"name": "gem"}}, "'pooling' is dict"),
    ({"normalized": 1}, "'normalized' is int"),
    ({"version": True}, "'version' is bool"),
])
def test_reader_is_strict_and_names_the_file_and_key(tmp_path, change, match):
    (tmp_path / "meta.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(ValueError, match=match) as exc:
        ModelRecord.read(tmp_path / "meta.json")
    assert str(tmp_path / "meta.json") in str(exc.value)


def test_missing_required_key(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "dim"}))
    with pytest.raises(ValueError, match="required key 'dim'"):
        ModelRecord.read(tmp_path)


def test_versions_and_next_version(tmp_path):
    for v in ("1", "3", "x", "4"):
        (tmp_path / "m" / v).mkdir(parents=True)
    for v in ("1", "3"):
        (tmp_path / "m" / v / "model.onnx").write_bytes(b"")
    assert versions(tmp_path / "m") == [1, 3] and next_version(tmp_path, "m") == 4
    assert next_version(tmp_path, "none") == 1


def test_the_demo_says_when_the_served_model_trained_on_its_queries(tmp_path):
    """`make demo` queries with the val photos: it says so when the served embedder (or the source of
    its reduction) was trained on them (the `trainval` production split)."""
    from visearch.demo import trained_on_val

    def version(n, split, **extra):
        d = tmp_path / "embedder" / str(n)
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"graph")
        ModelRecord.of(name="embedder", version=n, id=f"m{n}", architecture="a", input_name="images", input_size=8,
                       output_name="embeddings", dim=4, training={"train_split": {"split": split}}, **extra).write(d)

    version(1, "all")
    assert trained_on_val(tmp_path) is False
    version(2, "trainval", reduction={"source_version": 1})  # the reduction's source decides
    assert trained_on_val(tmp_path) is False
    version(3, "trainval")
    assert trained_on_val(tmp_path) is True
    assert trained_on_val(tmp_path / "nowhere") is False
