"""The embedder build: real pip-shipped weights, real ONNX Runtime, real grocery photos."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from visearch import datasets  # noqa: E402
from visearch.building import build_all  # noqa: E402
from visearch.imaging import to_model_input  # noqa: E402
from visearch.modeling import backbones, pooling  # noqa: E402
from visearch.modeling.embedder import NORMALISATION, make_embedder, sample_images  # noqa: E402
from visearch.modeling.export import build_embedder  # noqa: E402
from visearch.models.contract import DEFAULT_CONFIG, EmbedderConfig, check_config  # noqa: E402
from visearch.models.repository import ConfigMismatch  # noqa: E402

pytestmark = pytest.mark.train

GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")


def photo(rel: str) -> Image.Image:
    return Image.open(GROCERY / "dataset" / rel).convert("RGB")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    (meta,) = build_all(repo, ["embedder"], progress=lambda m: None)
    version_dir = repo / "embedder" / "1"
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return repo, meta, sess


def run(sess, batch: np.ndarray) -> np.ndarray:
    return sess.run(["embeddings"], {"images": batch})[0]


def sample(size: int, n: int) -> np.ndarray:
    return sample_images(size, n)[0]


# --------------------------------------------------------------------------- weights


@needs_grocery
@pytest.mark.parametrize("arch", sorted(backbones.SPECS))
def test_imagenet_weights_classify_real_fruit(arch):
    """The strict-loaded weights recognise grocery fruit as their ImageNet classes."""
    model = backbones.load_backbone(arch, 224)
    mean, std = NORMALISATION[arch]
    cases = {  # ImageNet-1k indices
        "train/Fruit/Banana/Banana_001.jpg": 954,
        "train/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg": 948,
        "train/Fruit/Pineapple/Pineapple_001.jpg": 953,
    }
    x = np.stack([to_model_input(photo(rel), 224) for rel in cases]).astype(np.float32) / 255
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    with torch.no_grad():
        top1 = model.logits(torch.from_numpy(x).permute(0, 3, 1, 2)).argmax(1).tolist()
    assert top1 == list(cases.values())


def test_unknown_backbone_and_weights_location():
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.load_backbone("resnet50")
    for arch in backbones.SPECS:
        assert backbones.weights_path(arch).stat().st_size > 1_000_000


# --------------------------------------------------------------------------- pooling


def test_pooling_relations():
    x = torch.rand(2, 8, 5, 7) + 0.01
    assert torch.allclose(pooling.gem(x, 1.0), pooling.spoc(x), atol=1e-6)
    assert torch.allclose(pooling.mac(x), x.flatten(2).max(-1).values)
    # GeM grows from the mean towards the max as p grows
    g3, g_hi = pooling.gem(x, 3.0), pooling.gem(x, 200.0)
    assert (pooling.spoc(x) <= g3 + 1e-6).all() and (g3 <= g_hi + 1e-6).all()
    assert (g_hi <= pooling.mac(x) + 1e-6).all() and torch.allclose(g_hi, pooling.mac(x), rtol=0.03)
    assert pooling.GeM(3.0)(x).shape == (2, 8)


def test_rmac_regions_square_maps():
    # 7x7 (224 px): level 1 whole map, level 2 four 4x4, level 3 nine 3x3
    r7 = pooling.rmac_regions(7, 7, 3)
    assert r7[0] == (0, 0, 7, 7)
    assert sorted(r7[1:5]) == [(0, 0, 4, 4), (0, 3, 4, 4), (3, 0, 4, 4), (3, 3, 4, 4)]
    assert {(y, x) for y, x, _, _ in r7[5:]} == {(y, x) for y in (0, 2, 4) for x in (0, 2, 4)}
    assert len(pooling.rmac_regions(10, 10, 3)) == 14
    # every region inside the map, also on a non-square map
    for h, w in ((7, 7), (10, 10), (6, 11), (12, 5)):
        for y, x, rh, rw in pooling.rmac_regions(h, w, 3):
            assert 0 <= y and y + rh <= h and 0 <= x and x + rw <= w
    assert len(pooling.rmac_regions(6, 11, 3)) > len(pooling.rmac_regions(6, 6, 3))


def test_rmac_is_normalised_sum_of_region_macs():
    x = torch.rand(1, 4, 7, 7)
    expect = sum(torch.nn.functional.normalize(pooling.mac(x[:, :, y:y + h, x0:x0 + w]), dim=-1)
                 for y, x0, h, w in pooling.rmac_regions(7, 7, 3))
    got = pooling.RMAC(3, feature_size=(7, 7))(x)
    assert torch.allclose(got, expect / expect.norm(), atol=1e-6)
    assert torch.allclose(got, pooling.rmac(x, 3), atol=1e-6)


# --------------------------------------------------------------------------- export


def test_meta_describes_the_model(built):
    repo, meta, sess = built
    cfg = DEFAULT_CONFIG
    version_dir = repo / "embedder" / "1"
    assert json.loads((version_dir / "meta.json").read_text()) == meta
    assert meta["name"] == "embedder" and meta["version"] == 1
    assert meta["architecture"] == cfg.arch and meta["pooling"] == cfg.pooling
    assert meta["input_name"] == "images" and meta["output_name"] == "embeddings"
    assert meta["input_size"] == cfg.size and meta["input_shape"] == [-1, cfg.size, cfg.size, 3]
    assert meta["input_format"] == "NHWC uint8 RGB, plain bilinear resize to SxS"
    assert meta["metric"] == "ip" and meta["dim"] == 1280 and meta["opset"] == 17
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert meta["weights_sha256"] == backbones.sha256_file(backbones.weights_path(cfg.arch))
    assert meta["model_sha256"] == backbones.sha256_file(version_dir / "model.onnx")
    assert "built_at" not in meta
    (inp,), outs = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [cfg.size, cfg.size, 3])
    out = outs[0]
    assert (out.name, out.type, out.shape[1:]) == ("embeddings", "tensor(float)", [meta["dim"]])
    assert not isinstance(inp.shape[0], int)  # dynamic batch axis
    # The region outputs of the same forward (re-ranking): projected map, FMP energies, query side.
    r = meta["regions"]
    h, w = r["map_size"]
    assert [(o.name, o.shape[1:]) for o in outs[1:]] == [
        ("region_map", [h, w, r["dim"]]), ("region_energy", [h, w, r["channels"]]), ("region_query", [r["dim"]])]
    assert r["fitted_on"].endswith("grocery train photos") and (h, w) == (cfg.size // 32, cfg.size // 32)
    emb, rmap, _, rq = sess.run([o.name for o in outs], {"images": sample(cfg.size, 2)})
    np.testing.assert_allclose(np.linalg.norm(rq, axis=1), 1.0, atol=1e-5)
    assert (rmap.sum((1, 2)) * rq).sum(1).min() > 0  # a frame resembles its own query in the region space


def test_dynamic_batch_and_unit_norm(built):
    _, meta, sess = built
    batch = sample(meta["input_size"], 3)
    three = run(sess, batch)
    one = run(sess, batch[:1])
    assert three.shape == (3, meta["dim"]) and three.dtype == np.float32 and one.shape == (1, meta["dim"])
    np.testing.assert_allclose(np.linalg.norm(three, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one[0], three[0], atol=1e-5)
    assert not np.allclose(three[0], three[1], atol=1e-3)  # different photos, different vectors


def test_torch_onnx_parity_on_real_images(built):
    _, meta, sess = built
    model = make_embedder(DEFAULT_CONFIG)
    batch = sample(meta["input_size"], 5)
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    assert np.abs(run(sess, batch) - ref).max() < 1e-4


def test_build_is_deterministic(built, tmp_path):
    _, meta, _ = built
    (again,) = build_all(tmp_path, ["embedder"], progress=lambda m: None)
    assert again == meta


def test_other_configs_export(tmp_path):
    cfg = EmbedderConfig(arch="mobilenet_v2", pooling="gem", size=224)
    meta = build_embedder(tmp_path, cfg, progress=lambda m: None)
    assert meta["id"] == "mobilenet_v2-gem3-224" and meta["pooling_params"]["p"] == 3.0
    sess = ort.InferenceSession(str(tmp_path / "embedder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = run(sess, sample(224, 2))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_config_pbtxt_must_agree(built, tmp_path):
    repo, meta, _ = built
    text = (repo / "embedder" / "config.pbtxt").read_text()
    check_config(repo / "embedder" / "config.pbtxt", DEFAULT_CONFIG, meta["dim"], meta["regions"])
    with pytest.raises(ConfigMismatch, match="outputs"):  # a config without the region outputs
        check_config(repo / "embedder" / "config.pbtxt", DEFAULT_CONFIG, meta["dim"])
    s = meta["input_size"]
    bad = tmp_path / "embedder" / "config.pbtxt"
    bad.parent.mkdir()
    bad.write_text(text.replace(f"dims: [ {s}, {s}, 3 ]", "dims: [ 224, 224, 3 ]" if s != 224 else "dims: [ 256, 256, 3 ]"))
    with pytest.raises(ConfigMismatch, match="dims"):
        build_all(tmp_path, ["embedder"], progress=lambda m: None)
    assert not (tmp_path / "embedder" / "1" / "model.onnx").exists()  # refused before exporting
    bad.write_text(text.replace("TYPE_FP32", "TYPE_FP16"))
    with pytest.raises(ConfigMismatch, match="TYPE_FP16"):
        build_all(tmp_path, ["embedder"], progress=lambda m: None)
    with pytest.raises(ValueError, match="unknown model"):
        build_all(tmp_path, ["classifier"], progress=lambda m: None)


def test_committed_config_matches_default():
    from pathlib import Path

    from visearch.modeling import regionhead

    committed = Path(__file__).resolve().parents[1] / "model_repository" / "embedder" / "config.pbtxt"
    side = DEFAULT_CONFIG.size // backbones.SPECS[DEFAULT_CONFIG.arch].stride
    regions = {"map_size": [side, side], "dim": regionhead.DEFAULT_DIM, "channels": regionhead.DEFAULT_CHANNELS}
    check_config(committed, DEFAULT_CONFIG, backbones.SPECS[DEFAULT_CONFIG.arch].dim, regions)


# --------------------------------------------------------------------------- retrieval sanity


@needs_grocery
def test_same_product_is_closer_than_a_different_product(built):
    _, meta, sess = built
    s = meta["input_size"]
    query = "val/Packages/Oat-Milk/Oatly-Oat-Milk/Oatly-Oat-Milk_001.jpg"
    same = "train/Packages/Oat-Milk/Oatly-Oat-Milk/Oatly-Oat-Milk_010.jpg"
    other = "train/Packages/Juice/Bravo-Orange-Juice/Bravo-Orange-Juice_001.jpg"
    q, a, b = run(sess, np.stack([to_model_input(photo(r), s) for r in (query, same, other)]))
    assert float(q @ a) > float(q @ b) + 0.05
