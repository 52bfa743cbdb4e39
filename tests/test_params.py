"""Trained parameters that come with the repository (visearch.training.params): what a pack keeps,
how close it gives the trained tensors back, that it refuses an altered file or another recipe, and
that the committed packs belong to the recipes the build serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visearch.checksum import sha256_file
from visearch.modeling import backbones
from visearch.training import default, detector
from visearch.training import params as packs
from visearch.training.train import load_checkpoint, load_config, save_checkpoint

pytestmark = pytest.mark.integration


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
            "frozen.weight": torch.randn(6, 5, generator=g), "steps": torch.tensor(3)}


def test_a_pack_keeps_what_changed_and_gives_it_back_within_its_rounding():
    base = _state(0)
    trained = dict(base)
    trained["conv.weight"] = base["conv.weight"] + 0.01 * torch.randn(8, 4, 3, 3)
    trained["conv.bias"] = base["conv.bias"] + 0.5
    trained["steps"] = torch.tensor(7)
    stable = {"conv.weight", "conv.bias", "frozen.weight", "steps"}
    arrays = packs.pack_state(trained, base, stable)
    assert packs.tensors(arrays) == 3  # "frozen.weight" did not change: not stored
    assert {k.rsplit("|", 1)[1] for k in arrays} == {"dq", "ds", "exact"}
    back = packs.unpack_state(arrays, base)
    assert torch.equal(back["frozen.weight"], base["frozen.weight"])
    assert torch.equal(back["conv.bias"], trained["conv.bias"]) and int(back["steps"]) == 7
    delta = (trained["conv.weight"] - base["conv.weight"]).reshape(8, -1)
    err = (back["conv.weight"] - trained["conv.weight"]).reshape(8, -1).abs().max(1).values
    assert torch.all(err <= delta.abs().max(1).values / 127 / 2 + 1e-7)  # half a step of the delta's scale
    assert err.max() > 0  # rounded, not copied: the test would pass on a float copy otherwise

    # A tensor whose start is random is stored itself (changed or not), not as a difference from
    # this build's start.
    arrays = packs.pack_state(trained, _state(1), set())
    assert packs.tensors(arrays) == 4 and not any(k.endswith("|dq") for k in arrays)
    back = packs.unpack_state(arrays, _state(1))
    w = trained["conv.weight"].reshape(8, -1)
    assert torch.all((back["conv.weight"].reshape(8, -1) - w).abs().max(1).values <= w.abs().max(1).values / 254 + 1e-7)


def test_a_pack_is_refused_when_its_bytes_or_format_are_not_the_recorded_ones(tmp_path):
    arrays = packs.pack_state(_state(2), _state(0), set())
    path = tmp_path / "p.npz"
    digest = packs.write_pack(path, arrays, {"recipe": "x"})
    assert (tmp_path / packs.SUMS).read_text() == f"{digest}  p.npz\n"
    got, meta = packs.read_pack(path)
    assert meta == {"recipe": "x"} and set(got) == set(arrays)
    packs.write_pack(tmp_path / "q.npz", arrays, {"recipe": "y"})  # a second pack keeps the first one's line
    assert len((tmp_path / packs.SUMS).read_text().splitlines()) == 2
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(packs.PackError, match="sha256"):
        packs.read_pack(path)
    with pytest.raises(packs.PackError, match="no pack"):
        packs.read_pack(tmp_path / "missing.npz")


def test_the_embedder_checkpoint_comes_back_from_its_pack_and_only_for_its_recipe(tmp_path):
    cfg = load_config(default.DEFAULT_CONFIG)
    base, stable = default._bases(cfg.model.to_dict())
    assert any(k.startswith("head.") for k in base) and not any(k.startswith("head.") for k in stable)
    assert any(k.startswith("backbone.") for k in stable)
    # A "trained" model: a top block moved, the projection random; the rest as the wheel has it.
    from visearch.training import model as tmodel

    model = tmodel.make_model(cfg.model)
    top = [k for k in stable if k.startswith("backbone.") and k.endswith("weight") and base[k].ndim == 4][-1]
    with torch.no_grad():
        model.state_dict()[top].add_(0.01 * torch.randn_like(base[top]))
    weights = backbones.sha256_file(backbones.weights_path(cfg.model.arch))
    meta = {"config": cfg.to_dict(), "weights_sha256": weights, "architecture": cfg.model.arch, "pooling": "rmac",
            "pooling_params": {"levels": 3}, "input_size": cfg.model.size, "loss": cfg.loss, "dim": cfg.model.dim,
            "config_note": "made by a test"}
    ckpt = tmp_path / "trained.pt"
    save_checkpoint(ckpt, model, meta)
    digest, n = default.pack(ckpt, tmp_path / "params" / default.PACK)
    assert n < 10, "only the moved block and the projection are stored"
    assert digest == sha256_file(tmp_path / "params" / default.PACK)

    best = default.default_checkpoint(runs=tmp_path / "runs", params=tmp_path / "params", progress=lambda m: None)
    assert best == tmp_path / "runs" / cfg.name / "best.pt"
    back, bmeta = load_checkpoint(best)
    assert bmeta["unpacked_from"].startswith(f"{default.PACK} (sha256 {digest})") and default.reusable(best, cfg)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, cfg.model.size, cfg.model.size, 3),
                                                           dtype=np.uint8))
    with torch.no_grad():
        cos = (back(x) * model.eval()(x)).sum(1)
    assert torch.all(cos > 0.999), cos

    other = load_config(default.REPO_ROOT / "configs" / "mirror-only.json")
    with pytest.raises(packs.PackError, match="another recipe"):
        default.unpack(tmp_path / "params" / default.PACK, other, tmp_path / "other.pt")


def test_the_committed_packs_belong_to_the_served_recipes():
    """params/ is what a first build serves: a changed recipe must come with its packs made again
    (`visearch models build --retrain && visearch models pack`)."""
    _, meta = packs.read_pack(packs.PARAMS_DIR / default.PACK)
    assert default.trained_by(meta, load_config(default.DEFAULT_CONFIG))
    arrays, dmeta = packs.read_pack(packs.PARAMS_DIR / detector.PACK)
    assert detector.default_recipe(dmeta) and dmeta["labels"] == list(detector.LABELS)
    assert arrays and all(k.startswith("heads.") for k in arrays)  # the frozen backbone comes from its wheel
    # The served PCA basis: fitted on the model a first build exports from embedder.npz (checked at
    # build time by that model's descriptors of the reference images, tests/test_reduce.py), to the
    # served dimension; its reference outputs are of the images this code makes.
    from visearch.modeling.reduce import DEFAULT_DIM, REFERENCE_IMAGES, pack_name, reference_record

    basis, pmeta = packs.read_pack(packs.PARAMS_DIR / pack_name("embedder", DEFAULT_DIM))
    assert basis["weight"].shape == (meta["dim"], DEFAULT_DIM) and basis["bias"].shape == (DEFAULT_DIM,)
    assert pmeta["dim"] == DEFAULT_DIM and pmeta["whitening_power"] == 0 and len(pmeta["source_sha256"]) == 64
    assert basis["reference_outputs"].shape == (REFERENCE_IMAGES, meta["dim"])
    assert np.allclose(np.linalg.norm(basis["reference_outputs"], axis=1), 1, atol=1e-5)
    assert pmeta["reference"] == reference_record(meta["input_size"]), "reference_images changed: make the pack again"


def test_the_detector_heads_come_back_from_their_pack(tmp_path):
    base, stable = detector._bases()
    assert all(".cls." in k for k in set(base) - stable)  # the new class heads are the random start
    state = dict(base)
    key = next(k for k in base if ".cls." in k and k.endswith("weight"))
    state[key] = base[key] + 0.1
    ckpt = tmp_path / "best.pt"
    torch.save({"model": state, "labels": detector.LABELS, "meta": dict(detector.DEFAULT_RECIPE, val_ap50=0.5)}, ckpt)
    digest, n = detector.pack(ckpt, tmp_path / "params" / detector.PACK)
    back = detector.unpack(tmp_path / "params" / detector.PACK, tmp_path / "out.pt")
    got = torch.load(back, map_location="cpu", weights_only=False)
    assert got["labels"] == list(detector.LABELS) and got["meta"]["val_ap50"] == 0.5
    assert (got["model"][key] - state[key]).abs().max() <= state[key].abs().max() / 254 + 1e-7
    assert n >= 1 and digest in got["meta"]["unpacked_from"]
