"""Training on real grocery photos, end to end but small: unit split, cache, a smoke run, export, configs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from visearch import datasets  # noqa: E402
from visearch.building import build_all  # noqa: E402
from visearch.modeling import pooling  # noqa: E402
from visearch.modeling.embedder import sample_images  # noqa: E402
from visearch.models.contract import DEFAULT_CONFIG, PARITY_TOL, EmbedderConfig, check_config, render_config  # noqa: E402
from visearch.training import cli, data, export, losses, train  # noqa: E402
from visearch.training import model as tmodel  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[1]
GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")

SMOKE = {
    "name": "smoke",
    "model": {"arch": "efficientnet_lite0", "pooling": "rmac", "size": 224, "train_from": 17, "dim": 64,
              "whitening_init": "random"},
    "loss": {"name": "triplet", "margin": 0.2, "strategy": "hard"},
    "p": 4, "k": 4, "lr": 0.01, "backbone_lr": 0.001, "warmup_steps": 1, "flip": False, "head_epochs": 1, "epochs": 1,
}


# --------------------------------------------------------------------------- the model split


def test_units_compose_to_the_backbone_and_cached_path_equals_the_export():
    torch.manual_seed(0)
    cfg = tmodel.ModelConfig(size=224, train_from=16, dim=32, whitening_init="random")
    model = tmodel.make_model(cfg).eval()
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    x = tmodel.normalise_images(model, images)
    with torch.no_grad():
        full = model.backbone.forward_features(x)
        assert torch.allclose(tmodel.run_units(model, x, 0), full, atol=1e-5)
        cut = tmodel.run_units(model, x, 0, cfg.train_from)  # what the cache stores
        assert torch.allclose(tmodel.embed_from(model, cut, cfg.train_from), model(images), atol=1e-5)
    assert tmodel.n_units("efficientnet_lite0") == len(tmodel.units(model.backbone)) == 18
    from visearch.modeling.backbones import EfficientNetLite

    assert tmodel.n_units("efficientnet_lite2") == len(tmodel.units(EfficientNetLite("efficientnet_lite2", 320))) == 23


def test_fast_rmac_equals_rmac():
    x = torch.rand(3, 16, 10, 10)
    for h, w in ((10, 10), (7, 9)):
        xi = x[:, :, :h, :w]
        assert torch.allclose(tmodel.fast_rmac(xi, pooling.rmac_regions(h, w, 3)), pooling.rmac(xi, 3), atol=1e-6)


def test_freezing_leaves_only_top_units_trainable():
    model = tmodel.make_model(tmodel.ModelConfig(size=224, train_from=16, dim=16))
    params = tmodel.set_trainable(model, 16, freeze_bn=True)
    names = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("_blocks.15.", "_conv_head.")) for n in names)
    assert len(params) == len(names)
    tmodel.train_mode(model, 16, freeze_bn=True)
    assert not model.backbone._blocks[3].training and not model.backbone._bn1.training
    assert model.head.training


def test_whitening_init_decorrelates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 3.0
    head = tmodel.Projection(8, 4)
    tmodel.init_whitening(head, x, shrink=0.0)
    with torch.no_grad():
        y = head(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(4), atol=1e-2)


def test_pk_sampler_batches_and_determinism():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7 + [3] * 1)
    s = data.PKSampler(labels, p=3, k=2, seed=1, steps=6)
    batches = list(s)
    assert len(batches) == 6 and all(len(b) == 6 for b in batches)
    for b in batches:
        lab = labels[b]
        assert len(set(lab.tolist())) == 3 and all((lab == c).sum() == 2 for c in set(lab.tolist()))
    assert [b.tolist() for b in data.PKSampler(labels, 3, 2, seed=1, steps=6)] == [b.tolist() for b in batches]


def test_package_types_cover_the_coarse_groups():
    assert data.PACKAGE_TYPES["Juice"] == "juice" and data.PACKAGE_TYPES["Soyghurt"] == "yoghurt"
    assert set(data.PACKAGE_TYPES.values()) <= set(data.PACKAGE_TYPE_NAMES)


def test_configs_parse():
    paths = sorted((ROOT / "configs").glob("*.json"))
    assert paths, "no training configs"
    for p in paths:
        cfg = train.load_config(p)
        assert cfg.loss["name"] in losses.LOSSES, p
        assert cfg.split in ("all", "cd", "trainval"), p
    with pytest.raises(ValueError, match="unknown config key"):
        train.TrainConfig.from_dict({"epochz": 3})


# --------------------------------------------------------------------------- a real (small) run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if GROCERY is None:
        pytest.skip("grocery dataset not found")
    tmp = tmp_path_factory.mktemp("train")
    cfg_path = tmp / "smoke.json"
    cfg_path.write_text(json.dumps(SMOKE))
    out = tmp / "run"
    rc = cli.main(["--config", str(cfg_path), "--out", str(out), "--smoke", "--cache", str(tmp / "cache"),
                   "--threads", "2"])
    assert rc == 0
    return out, tmp / "cache"


@needs_grocery
def test_smoke_run_writes_checkpoint_history_and_curve(smoke_run):
    out, _ = smoke_run
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    for key in ("architecture", "pooling", "whitening", "mean", "std", "input_size", "dim", "loss", "config", "seed",
                "train_split", "holdout_metrics", "id"):
        assert key in meta, key
    assert meta["architecture"] == "efficientnet_lite0" and meta["input_size"] == 224 and meta["dim"] == 64
    assert meta["train_split"]["split"] == "all" and "val never used" in meta["train_split"]["description"]
    assert 0 <= meta["holdout_metrics"]["mAP"] <= 1
    hist = json.loads((out / "history.json").read_text())
    assert hist["history"][0]["epoch"] == 0 and "loss" in hist["history"][-1]
    assert (out / "loss.png").stat().st_size > 1000
    # the frozen maps were cached, one file per image, keyed by the weights
    cached = list(next(p for p in smoke_run[1].iterdir() if p.is_dir()).glob("*-id.npy"))
    assert len(cached) >= 8


@needs_grocery
def test_smoke_run_on_made_up_views(smoke_run, tmp_path):
    """Made-up views (`aug<i>`) are cached beside the photo and drawn per photo in the batches."""
    _, cache = smoke_run
    cfg = train.TrainConfig.from_dict({**SMOKE, "name": "aug", "views": ["id", "aug0"], "view_mix": "sample"})
    run = train.train(cfg, tmp_path / "aug", progress=lambda m: None, smoke=True, cache_root=cache)
    assert run.best.is_file() and run.meta["config"]["views"] == ["id", "aug0"]
    cache_dir = next(p for p in cache.iterdir() if p.is_dir())
    aug = {p.name.split("-")[0] for p in cache_dir.glob("*-aug0.npy")}
    assert aug and aug <= {p.name.split("-")[0] for p in cache_dir.glob("*-id.npy")}


def test_a_budget_cuts_the_planned_epochs_to_what_the_measured_pace_fits():
    """1 epoch of 10 s took the run to 20 s; evaluations take 4 s, one every 2 epochs: a further epoch costs 12 s,
    and the room left is 100 - 20 - 4 (the last epoch's evaluation) = 76 s: 6 more, 7 in all."""
    assert train.epochs_within(100, 20, 10, 4, 2, 1, 40) == 7
    assert train.epochs_within(100, 20, 10, 4, 2, 1, 5) == 5  # the plan fits: unchanged
    assert train.epochs_within(100, 20, 10, 4, 1, 1, 40) == 6  # an evaluation every epoch: 14 s each
    assert train.epochs_within(30, 45, 10, 4, 2, 3, 40) == 3  # already past it: the epochs done, never fewer


@needs_grocery
def test_a_sigint_while_fine_tuning_ends_the_run_with_its_best_checkpoint(smoke_run, tmp_path):
    """A real SIGINT (what `timeout -s INT` sends the GPU run) once a checkpoint is saved: the run ends as finished,
    its history says where it stopped. Before anything is saved it stops the run as usual."""
    _, cache = smoke_run
    cfg = train.TrainConfig.from_dict({**SMOKE, "name": "cut"})

    def interrupt_at(text):
        def progress(msg):
            if text in msg:
                signal.raise_signal(signal.SIGINT)
        return progress

    run = train.train(cfg, tmp_path / "cut", progress=interrupt_at("fine-tune epoch"), smoke=True, cache_root=cache,
                      budget=3600)
    assert run.interrupted_in_epoch == 2 and run.epochs_run == 1 and run.best.is_file()
    hist = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert hist["interrupted_in_epoch"] == 2 and hist["budget_s"] == 3600 and hist["planned_epochs"] == 1
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tmp_path / "early", progress=interrupt_at("before training"), smoke=True, cache_root=cache)
    assert not (tmp_path / "early" / "best.pt").exists()


@needs_grocery
def test_made_up_views_are_seeded_by_the_image():
    path = datasets.grocery_split(GROCERY, "train")[0].path
    a, b, ident = data.load_input(path, 96, "aug0"), data.load_input(path, 96, "aug0"), data.load_input(path, 96, "id")
    assert a.shape == ident.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, ident)
    assert not np.array_equal(a, data.load_input(path, 96, "aug1"))
    with pytest.raises(ValueError, match="unknown view"):
        data.load_input(path, 96, "augx")
    with pytest.raises(ValueError, match="view_mix"):
        train.TrainConfig.from_dict({**SMOKE, "view_mix": "pixel"})


@needs_grocery
def test_smoke_training_lowers_the_loss(smoke_run):
    """The loss on one fixed batch of the training photos (no augmentation) drops over the run."""
    out, _ = smoke_run
    hist = json.loads((out / "history.json").read_text())["history"]
    assert hist[-1]["fixed_batch_loss"] < hist[0]["fixed_batch_loss"]


@needs_grocery
def test_export_runs_in_onnxruntime_with_parity(smoke_run, tmp_path):
    out, _ = smoke_run
    meta = export.export_checkpoint(out / "best.pt", tmp_path / "repo", version=3, progress=lambda m: None,
                                    write_config=True)
    vdir = tmp_path / "repo" / "embedder" / "3"
    assert json.loads((vdir / "meta.json").read_text()) == meta
    assert meta["fine_tuned"] and meta["dim"] == 64 and meta["input_size"] == 224 and meta["version"] == 3
    assert meta["parity_max_abs_diff"] < PARITY_TOL
    check_config(tmp_path / "repo" / "embedder" / "config.pbtxt",
                       EmbedderConfig(size=224, version=3), 64, meta["regions"])
    assert meta["regions"]["dim"] == 64  # the region space is at most the projection's dimension
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp, *regions) = sess.get_inputs(), sess.get_outputs()
    assert [o.name for o in regions] == ["region_map", "region_energy", "region_query"]
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [224, 224, 3])
    assert (outp.name, outp.shape[1:]) == ("embeddings", [64])
    batch = sample_images(224, 3)[0]
    got = sess.run(["embeddings"], {"images": batch})[0]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    model, _ = train.load_checkpoint(out / "best.pt")
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    assert np.abs(got - ref).max() < 1e-4
    one = sess.run(["embeddings"], {"images": batch[:1]})[0]
    np.testing.assert_allclose(one[0], got[0], atol=1e-5)  # dynamic batch


@needs_grocery
def test_a_checkpoint_is_served_at_another_input_size_and_measured_by_bench_multiscale(smoke_run, tmp_path):
    """`visearch export --size` serves a checkpoint at an input size it did not train at (the same
    weights: the graph's input is that size, and a forward gives unit descriptors); a size that is not
    a multiple of 32 is refused. bench.multiscale's smoke run scores each size and a combination of
    them on the selection protocol and the reported ones, and chooses on the selection one."""
    from bench import multiscale

    out, _ = smoke_run
    repo = tmp_path / "repo"
    assert export.main(["--checkpoint", str(out / "best.pt"), "--repo", str(repo), "--size", "256", "--write-config"]) == 0
    meta = json.loads((repo / "embedder" / "1" / "meta.json").read_text())
    assert meta["input_size"] == 256 and meta["parity_max_abs_diff"] < PARITY_TOL
    sess = ort.InferenceSession(str(repo / "embedder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [256, 256, 3]
    got = sess.run(["embeddings"], {"images": sample_images(256, 2)[0]})[0]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert export.main(["--checkpoint", str(out / "best.pt"), "--repo", str(tmp_path / "bad"), "--size", "250"]) == 1

    r = multiscale.run(out / "best.pt", [192, 224], [(192, 224)], ["P1"], "TH", tmp_path / "ms", smoke=True)
    assert [row["sizes"] for row in r["rows"]] == ["192", "224", "192+224"]
    for row in r["rows"]:
        assert set(row["results"]) == {"TH", "P1"} and 0 <= row["results"]["TH"]["mAP"] <= 1
        assert row["ms_per_image"] > 0
    assert r["rows"][2]["ms_per_image"] == pytest.approx(r["rows"][0]["ms_per_image"] + r["rows"][1]["ms_per_image"],
                                                         abs=0.11)
    top = max(x["results"]["TH"]["mAP"] for x in r["rows"])
    near = [x for x in r["rows"] if x["results"]["TH"]["mAP"] >= top - 0.005]
    assert r["chosen"] == min(near, key=lambda x: x["ms_per_image"])["sizes"]
    assert all(0 <= x["results"]["P1"]["R@1"] <= 1 for x in r["rows"])
    assert (tmp_path / "ms" / "result.md").read_text().startswith("Checkpoint")


@needs_grocery
def test_export_cli_refuses_a_mismatched_config(smoke_run, tmp_path):
    out, _ = smoke_run
    repo = tmp_path / "repo"
    (repo / "embedder").mkdir(parents=True)
    (repo / "embedder" / "config.pbtxt").write_text(render_config(DEFAULT_CONFIG, 1280))
    assert export.main(["--checkpoint", str(out / "best.pt"), "--repo", str(repo)]) == 1
    assert not (repo / "embedder" / "1" / "model.onnx").exists()


@needs_grocery
def test_models_build_exports_a_checkpoint_as_the_embedder(smoke_run, tmp_path):
    out, _ = smoke_run
    (meta,) = build_all(tmp_path, ["embedder"], progress=lambda m: None, write_config=True,
                              checkpoint=out / "best.pt")
    assert meta["fine_tuned"] and meta["id"].startswith("efficientnet_lite0-rmac3-224-ft-")
    assert (tmp_path / "embedder" / "1" / "model.onnx").is_file()


@needs_grocery
def test_mining_smoke_run_measures_pair_precision(smoke_run, tmp_path):
    _, cache = smoke_run
    cfg = train.TrainConfig.from_dict({**SMOKE, "name": "mine", "split": "cd",
                                       "mining": {"pool": "cd-unseen", "k": 3, "threshold": 0.5}})
    from visearch.training.mining import mine_and_retrain

    summary = mine_and_retrain(cfg, tmp_path / "mine", smoke=True, cache_root=cache, progress=lambda m: None)
    q = summary["mining"]
    assert q["pool_photos"] == 24 and q["threshold"] == 0.5
    assert q["pairs"]["pairs"] == 0 or 0.0 <= q["pairs"]["precision"] <= 1.0
    assert (tmp_path / "mine" / "mined" / "best.pt").is_file()
    assert json.loads((tmp_path / "mine" / "mining.json").read_text())["mining"] == q


@needs_grocery
def test_default_checkpoint_is_reused_only_for_the_same_recipe(smoke_run, tmp_path):
    """`visearch models build` retrains the default only when runs/ lacks that exact recipe's checkpoint."""
    from visearch.training import default

    out, _ = smoke_run
    cfg = train.TrainConfig.from_dict(SMOKE)
    assert default.reusable(out / "best.pt", cfg)
    assert not default.reusable(out / "best.pt", train.TrainConfig.from_dict({**SMOKE, "lr": 0.02}))
    assert not default.reusable(tmp_path / "missing.pt", cfg)
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    assert not default.reusable(tmp_path / "torn.pt", cfg)
    # a runs/ folder holding that run is reused, not retrained
    runs = tmp_path / "runs"
    (runs / "smoke").mkdir(parents=True)
    (runs / "smoke" / "best.pt").write_bytes((out / "best.pt").read_bytes())
    cfg_path = tmp_path / "smoke.json"
    cfg_path.write_text(json.dumps(SMOKE))
    said = []
    assert default.default_checkpoint(cfg_path, runs, progress=said.append) == runs / "smoke" / "best.pt"
    assert said and said[0].startswith("reusing")


# --------------------------------------------------------------------------- weight-space ensembles (WiSE-FT)


@needs_grocery
def test_wise_interpolates_between_the_pretrained_model_and_the_fine_tuned_one(smoke_run, tmp_path):
    from visearch.training import wise

    out, cache = smoke_run
    ckpt = out / "best.pt"
    ft, meta = train.load_checkpoint(ckpt)
    mcfg = tmodel.ModelConfig.from_dict(meta["config"]["model"])
    photos = datasets.grocery_split(GROCERY, "train")[:6]
    maps = torch.from_numpy(data.FeatureCache(mcfg, cache).maps(photos)).float()

    def emb(model):
        with torch.no_grad():
            return tmodel.embed_from(model, maps, mcfg.cut).numpy()

    one, m1 = wise.interpolate(ckpt, 1.0)
    assert np.allclose(emb(one), emb(ft), atol=1e-6) and m1["wise"]["alpha"] == 1.0
    # alpha 0: the off-the-shelf descriptor, in the projection's shape (64 of the 1280 dims here: its first rows)
    zero, _ = wise.interpolate(ckpt, 0.0)
    plain = tmodel.make_model(tmodel.ModelConfig.from_dict({**meta["config"]["model"], "dim": 0}))
    with torch.no_grad():
        v = tmodel.pool_features(plain, tmodel.run_units(plain, maps, mcfg.cut))[:, :64]
    v = (v / v.norm(dim=1, keepdim=True)).numpy()
    assert np.allclose(emb(zero), v, atol=1e-5)
    half, _ = wise.interpolate(ckpt, 0.5)
    assert not np.allclose(emb(half), emb(ft), atol=1e-3) and not np.allclose(emb(half), emb(zero), atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        wise.interpolate(ckpt, 1.5)
    # the CLI writes an ordinary checkpoint that exports
    assert wise.main([str(ckpt), "--out", str(tmp_path / "w"), "--alpha", "0.5"]) == 0
    meta_w = export.export_checkpoint(tmp_path / "w" / "best.pt", tmp_path / "repo", version=1, progress=lambda m: None,
                                      write_config=True)
    assert meta_w["parity_max_abs_diff"] < PARITY_TOL


def test_wise_rule_keeps_generality_then_the_best_hold_out():
    from visearch.training import wise

    rows = [{"alpha": a, "GS": {"mAP": g}, "TH": {"mAP": t}}
            for a, g, t in ((0.0, 0.96, 0.5), (0.35, 0.958, 0.8), (0.5, 0.951, 0.93), (1.0, 0.92, 0.98))]
    assert wise.choose(rows)["alpha"] == 0.5  # GS 0.951 >= 0.96 - 0.01, the best TH of those
    assert wise.choose(rows, tolerance=0.005)["alpha"] == 0.35
    assert wise.choose(rows, tolerance=0.05)["alpha"] == 1.0


def test_the_production_split_adds_the_val_photos_and_keeps_the_selection_honest(grocery):
    """`trainval` (the production model) trains on `all`'s photos plus every val photo of a product,
    and selects on TH, none of whose queries it trains on."""
    from visearch.training.data import training_protocol

    base, th = training_protocol(grocery["root"], "all")
    photos, proto = training_protocol(grocery["root"], "trainval")
    val = [p for p in grocery["val"] if p.is_product]
    assert proto.name == th.name == "TH" and len(photos) == len(base) + len(val)
    assert {p.path for p in photos} == {p.path for p in base} | {p.path for p in val}
    assert not {p.path for p in proto.queries} & {p.path for p in photos}
    with pytest.raises(ValueError, match="trainval"):
        training_protocol(grocery["root"], "everything")


def test_the_iconic_splits_add_each_products_studio_image_and_no_query(grocery):
    """`iconic` and `trainval-iconic` add the studio image of each of the 31 products (P3's database), never a
    photo P1's or P3's queries come from when the val photos are left out."""
    from visearch.datasets import grocery_iconic
    from visearch.training.data import training_protocol

    iconic = {p.path for p in grocery_iconic(grocery["root"]) if p.is_product}
    assert len(iconic) == 31
    for base, split in (("all", "iconic"), ("trainval", "trainval-iconic")):
        before, th = training_protocol(grocery["root"], base)
        photos, proto = training_protocol(grocery["root"], split)
        assert proto.name == th.name == "TH" and {p.path for p in photos} == {p.path for p in before} | iconic
        assert not {p.path for p in proto.queries} & {p.path for p in photos}
    photos, _ = training_protocol(grocery["root"], "iconic")
    assert not {p.path for p in grocery["val"]} & {p.path for p in photos}
