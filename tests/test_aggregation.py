"""Descriptor methods on real grocery photos: shapes, norms, hand computations, whitening, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402

from visearch import datasets  # noqa: E402
from visearch.modeling import aggregation as agg  # noqa: E402
from visearch.modeling import methods  # noqa: E402
from visearch.modeling.whitening import Whiten, learn_pca_whitening, pca  # noqa: E402

pytestmark = pytest.mark.train

GROCERY = datasets.grocery_root()
needs_grocery = pytest.mark.skipif(GROCERY is None, reason="grocery dataset not found (set VISEARCH_GROCERY_DIR)")
ARCH, SIZE = "mobilenet_v2", 224  # the cheapest backbone: maps of 16 photos in about a second


def pick_photos() -> tuple[list, list]:
    """(fit photos, evaluation photos): 3 + 2 train photos of products 28..31, and 4 fruit/veg to fit on too.

    Methods are fitted on one set and measured on the other, as in the protocols.
    """
    train = datasets.grocery_split(GROCERY, "train")
    fit, held = [], []
    for fid in range(28, 32):
        ps = [p for p in train if p.fine_id == fid]
        fit += ps[:3]
        held += ps[-2:]
    others = [p for p in train if not p.is_product]
    return fit + others[:: len(others) // 4][:4], held


@pytest.fixture(scope="module")
def store():
    from visearch.evaluation.features import FeatureStore

    torch.manual_seed(0)
    s = FeatureStore(ARCH, SIZE, cache=None)
    s.fit_photos, s.photos = pick_photos()
    s.prepare([p.path for p in s.fit_photos + s.photos])
    return s


@pytest.fixture(scope="module")
def ctx(store):
    return methods.FitContext(ARCH, SIZE, store.shapes, store.maps, [p.path for p in store.fit_photos])


def export_head(head: methods.Head, shapes: dict, path) -> None:
    """Export the head alone (feature maps in, descriptor out): seconds, not a backbone per method."""
    names = [f"map_{t}" for t in head.taps]
    dummy = tuple(torch.rand(2, *shapes[t]) for t in head.taps)
    torch.onnx.export(head, dummy, str(path), input_names=names, output_names=["embeddings"],
                      dynamic_axes={**{n: {0: "batch"} for n in names}, "embeddings": {0: "batch"}},
                      opset_version=17, dynamo=False)


# --------------------------------------------------------------------------- hand computations


def test_vlad_matches_hand_computation():
    # 2 centres in 2-D; 3 local descriptors: two near c0, one near c1.
    c = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x = torch.tensor([[[0.2, -0.1, 0.9], [0.0, 0.3, 1.2]]])  # [N=1, D=2, M=3]: columns (0.2,0), (-0.1,0.3), (0.9,1.2)
    v0 = np.array([0.2 - 0.1, 0.0 + 0.3])  # residuals to c0 summed
    v1 = np.array([0.9 - 1.0, 1.2 - 1.0])
    raw = np.concatenate([v0, v1])
    np.testing.assert_allclose(agg.vlad(x, c, intra=False, power=None)[0].numpy(), raw / np.linalg.norm(raw), atol=1e-6)
    intra = np.concatenate([v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)])
    np.testing.assert_allclose(agg.vlad(x, c, intra=True, power=None)[0].numpy(), intra / np.linalg.norm(intra), atol=1e-6)
    sq = np.sign(intra) * np.sqrt(np.abs(intra))
    np.testing.assert_allclose(agg.vlad(x, c)[0].numpy(), sq / np.linalg.norm(sq), atol=1e-6)
    # the module on a [N, D, h, w] map gives the same
    m = agg.VLAD(c.numpy())
    np.testing.assert_allclose(m(x.view(1, 2, 3, 1))[0].numpy(), sq / np.linalg.norm(sq), atol=1e-6)


def test_netvlad_soft_assignment_and_hard_limit():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    centres = agg.kmeans(X, 5, seed=0)
    alpha = agg.netvlad_alpha(X, centres)
    nv = agg.NetVLAD.from_centres(centres, alpha)
    x = torch.from_numpy(X.T.reshape(1, 8, 20, 20).copy())
    a = nv.soft_assignment(x)
    assert a.shape == (1, 5, 400)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 400), atol=1e-5, rtol=0)
    out = nv(x)
    assert out.shape == (1, 40)
    assert abs(float(out.detach().norm()) - 1) < 1e-5
    # a very sharp softmax is hard assignment: NetVLAD -> VLAD (no power normalisation)
    sharp = agg.NetVLAD.from_centres(centres, 1e4)
    hard = agg.vlad(F.normalize(x, dim=1).flatten(2), torch.from_numpy(centres), power=None)
    torch.testing.assert_close(sharp(x), hard, atol=1e-4, rtol=0)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(1)
    true = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    X = np.concatenate([t + rng.normal(scale=0.3, size=(100, 2)) for t in true]).astype(np.float32)
    c = agg.kmeans(X, 3, seed=0)
    d = np.linalg.norm(c[:, None] - true[None], axis=2).min(0)
    assert d.max() < 0.2


def test_second_order_bilinear_is_hand_computed():
    m = agg.SecondOrderFusion(6, reduce_dim=3, out_dim=4)
    x = torch.rand(2, 6, 4, 5)
    z = m.reduce(x).flatten(2)[0]  # [3, 20]
    B = (z @ z.T / 20).detach().numpy()
    v = B[np.triu_indices(3)]
    v = np.sign(v) * np.sqrt(np.abs(v))
    np.testing.assert_allclose(m.bilinear(x)[0].detach().numpy(), v / np.linalg.norm(v), atol=1e-5)
    assert m(x).shape == (2, 10)


def test_multilevel_fusion_fast_path_equals_literal_order():
    torch.manual_seed(0)
    m = agg.MultiLevelFusion([4, 6], [(8, 8), (4, 4)], out_dim=5)
    with torch.no_grad():
        for conv in m.convs:
            conv.weight.normal_()
        m.level_weights.copy_(torch.tensor([0.7, 1.3]))
    a, b = torch.rand(3, 4, 8, 8), torch.rand(3, 6, 4, 4)
    literal = F.normalize(m.fused_map(a, b).sum((2, 3)), dim=-1)
    torch.testing.assert_close(m(a, b), literal, atol=1e-5, rtol=0)
    # concatenation init: the output is the concatenation of the per-level pooled maps
    cat = agg.MultiLevelFusion([4, 6], [(8, 8), (4, 4)])
    want = F.normalize(torch.cat([F.max_pool2d(a, 2).mean((2, 3)), b.mean((2, 3))], 1), dim=-1)
    torch.testing.assert_close(cat(a, b), want, atol=1e-6, rtol=0)


def test_window_grid():
    assert agg.window_grid(10, 5, 5) == [0, 1, 2, 4, 5] or len(agg.window_grid(10, 5, 5)) == 5
    assert agg.window_grid(10, 3, 7)[0] == 0 and agg.window_grid(10, 3, 7)[-1] == 7
    r = agg.RegionMAC((10, 10), 5, 5)
    x = torch.rand(1, 3, 10, 10)
    out = r(x)
    assert out.shape == (1, 3, r.n_regions)
    y0, x0 = int(r.ys[1]), int(r.xs[2])
    torch.testing.assert_close(out[0, :, 1 * len(r.xs) + 2], x[0, :, y0:y0 + 5, x0:x0 + 5].amax((1, 2)))


# --------------------------------------------------------------------------- whitening


def test_whitening_decorrelates_synthetic_and_reduces():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    X = rng.normal(size=(2000, 6)) @ A + 3.0
    mean, P = learn_pca_whitening(X, dim=4, power=0.5)
    Y = (X - mean) @ P.T
    np.testing.assert_allclose(np.cov(Y.T, bias=True), np.eye(4), atol=1e-3)
    m0, P0 = learn_pca_whitening(X, power=0.0)  # plain PCA: a rotation, variances = eigenvalues
    _, eig, _ = pca(X)
    np.testing.assert_allclose(np.var((X - m0) @ P0.T, axis=0), eig, rtol=1e-3)
    with pytest.raises(ValueError, match="whitening dim"):
        learn_pca_whitening(X[:3], dim=4)


@needs_grocery
def test_whitening_learned_on_real_descriptors_decorrelates_them(store):
    X = methods.describe(lambda h: F.normalize(h.mean((2, 3)), dim=-1), store.maps, ("head",),
                         [p.path for p in store.fit_photos + store.photos])
    w = Whiten.learn(X, dim=12, power=0.5, normalize=False)
    with torch.no_grad():
        Y = w(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(np.cov(Y.T, bias=True), np.eye(12), atol=1e-3)
    corr_before = np.abs(np.corrcoef(X[:, :12].T) - np.eye(12)).max()
    assert corr_before > 0.1  # the raw SPoC dimensions are correlated; the whitened ones are not


# --------------------------------------------------------------------------- every method on real maps


@needs_grocery
@pytest.mark.parametrize("name", list(methods.METHODS))
def test_method_on_real_photos_and_onnx_parity(name, store, ctx, tmp_path):
    # small codebooks: 16 photos give only a few hundred local descriptors
    hp = {"tap": "s7", "k": 16, "wdim": 8} if name in ("conv-vlad", "netvlad") else {"wdim": 8, "k": 8}
    head = methods.fit_method(name, ctx, hp)
    paths = [p.path for p in store.photos]
    maps = next(store.maps(head.taps, paths))
    with torch.no_grad():
        out = head(*maps)
    assert out.shape == (len(paths), head.dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert torch.isfinite(out).all()
    # same-product photos are closer than other pairs (a weak, real sanity check)
    sims = (out @ out.T).numpy()
    fid = np.array([p.fine_id for p in store.photos])
    same = (fid[:, None] == fid[None]) & ~np.eye(len(fid), dtype=bool)
    assert sims[same].mean() > sims[fid[:, None] != fid[None]].mean()
    # ONNX: the head alone, on the same maps
    path = tmp_path / f"{name}.onnx"
    export_head(head, store.shapes, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {f"map_{t}": m.numpy() for t, m in zip(head.taps, maps, strict=True)})[0]
    diff = float(np.abs(got - out.numpy()).max())
    print(f"{name}: dim {head.dim}, max |torch - onnxruntime| = {diff:.1e}")
    assert diff < 1e-4


@needs_grocery
def test_full_method_model_exports_with_normalisation_inside(store, ctx, tmp_path):
    """uint8 images in, whitened L2 descriptors out: the whole graph (backbone taps, NetVLAD, whitening)."""
    from visearch.evaluation.features import load_batch

    head = methods.fit_method("netvlad", ctx, {"tap": "s5", "wdim": 8})
    model = methods.make_method_embedder(ARCH, SIZE, head, backbone=store.backbone)
    path = tmp_path / "netvlad.onnx"
    methods.export_method_onnx(model, SIZE, path)
    batch = load_batch([p.path for p in store.photos[:3]], SIZE)
    diff = methods.onnx_parity(model, path, batch)
    print(f"netvlad full model: max |torch - onnxruntime| = {diff:.1e}")
    assert diff < 1e-4
    # and the head on cached maps is the model on images
    with torch.no_grad():
        from_maps = head(*next(store.maps(head.taps, [p.path for p in store.photos[:3]])))
        from_images = model(torch.from_numpy(batch))
    torch.testing.assert_close(from_maps, from_images, atol=1e-5, rtol=0)


@needs_grocery
def test_tap_backbone_head_equals_forward_features(store):
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        (head,) = methods.TapBackbone(store.backbone, ("head",))(x)
        torch.testing.assert_close(head, store.backbone.forward_features(x))
    assert store.shapes == {"s5": (96, 14, 14), "s7": (320, 7, 7), "head": (1280, 7, 7)}
