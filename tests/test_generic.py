"""The generic protocols (visearch.evaluation.generic): real registry photos, made-up views, and a
selection twin (GS) that shares nothing with the reported ones (G, GR)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visearch.evaluation import generic
from visearch.evaluation.harness import evaluate_embeddings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def protos(tmp_path_factory):
    return generic.generic_protocols(tmp_path_factory.mktemp("generic"), [], ("G", "GR", "GS")), tmp_path_factory


def _ahash(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        g = np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return (g > g.mean()).ravel()


def test_sizes_and_positives(protos):
    ps, _ = protos
    g, gr = ps["G"], ps["GR"]
    assert len(ps["GS"].database) == sum(len(m) for _, m in generic.GS_GROUPS) + len(generic.GS_SINGLES)
    n_photos = sum(len(m) for _, m in generic.GROUPS) + len(generic.SINGLES)
    assert len(g.database) == n_photos and len(g.queries) == generic.N_QUERY_VIEWS * n_photos
    assert len(gr.queries) == len(generic.GROUPS)
    for p in ps.values():
        for q in p.queries:
            pos = p.positives(q)
            assert pos and all(p.database[i].fine_id == q.fine_id for i in pos)
    assert not {q.path for q in gr.queries} & {d.path for d in gr.database}  # a GR query is never its own answer
    # a made-up view is another picture than its original: smaller, and not the same pixels
    q = g.queries[0]
    orig = g.database[sorted(g.positives(q))[0]]
    with Image.open(q.path) as a, Image.open(orig.path) as b:
        assert a.size[0] * a.size[1] < b.size[0] * b.size[1]


def test_selection_photos_are_not_the_reported_ones(protos):
    ps, _ = protos
    reported = [d.path for d in ps["G"].database]
    selection = [d.path for d in ps["GS"].database]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(p) for p in reported} & {digest(p) for p in selection}
    hashes = np.stack([_ahash(p) for p in reported])
    for p in selection:  # no near-duplicate either (8x8 average hash within 6 bits)
        assert (hashes != _ahash(p)).sum(1).min() > 6, p


def test_views_are_made_once_and_the_same_everywhere(protos, tmp_path):
    ps, _ = protos
    again = generic.generic_protocols(tmp_path, [], ("G",))["G"]
    for a, b in zip(ps["G"].queries[:6], again.queries[:6], strict=True):
        assert a.path != b.path and a.path.read_bytes() == b.path.read_bytes()
    before = {p: p.stat().st_mtime_ns for p in (q.path for q in again.queries[:6])}
    generic.generic_protocols(tmp_path, [], ("G",))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_the_served_embedder_solves_most_of_g(protos, model_repo):
    """The protocol is hard but not noise: the embedder (off the shelf in CI) finds most originals."""
    import onnxruntime as ort

    from visearch.offline import load_batch

    ps, _ = protos
    g = ps["G"]
    version = max(int(p.name) for p in (model_repo / "embedder").iterdir() if p.name.isdigit())
    sess = ort.InferenceSession(str(model_repo / "embedder" / str(version) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    size = sess.get_inputs()[0].shape[1]

    name = sess.get_inputs()[0].name

    def embed(photos):
        return np.concatenate([sess.run(None, {name: load_batch([p.path for p in photos[i:i + 32]], size)})[0]
                               for i in range(0, len(photos), 32)])

    m = evaluate_embeddings(g, embed(g.queries), embed(g.database))
    assert 0.75 < m["mAP"] < 0.999 and m["n_queries"] == len(g.queries)


def test_missing_photos_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(generic, "CV_DIR", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="apt-get install opencv-doc"):
        generic.generic_protocols(tmp_path, [], ("GS",))
