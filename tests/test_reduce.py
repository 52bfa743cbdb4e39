"""`visearch models reduce`: the served embedder with PCA in its graph as the next version, served
beside its source by the real embedding service, each version with its own dimension."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import channel
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc

pytestmark = pytest.mark.integration


def source_repo(model_repo, dst):
    """A repository holding the served embedder's first plain (not reduced) version as version 1."""
    for name in ("embedder", "detector"):
        (dst / name).mkdir(parents=True)
        shutil.copy(model_repo / name / "config.pbtxt", dst / name / "config.pbtxt")
    plain = min(p for p in (model_repo / "embedder").iterdir()
                if p.name.isdigit() and "reduction" not in json.loads((p / "meta.json").read_text()))
    (dst / "embedder" / "1").symlink_to(plain.resolve())
    det = max((p for p in (model_repo / "detector").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    (dst / "detector" / "1").symlink_to(det.resolve())
    return dst


def test_reduced_version_is_built_checked_and_served_beside_its_source(model_repo, grocery, tmp_path):
    from dataclasses import replace

    from visearch.checksum import sha256_file
    from visearch.modeling.reduce import reduce_embedder
    from visearch.models.contract import DEFAULT_CONFIG, check_config

    repo = source_repo(model_repo, tmp_path / "repo")
    src_meta = json.loads((repo / "embedder" / "1" / "meta.json").read_text())
    fit = [p.path for p in grocery["train"][::50][:40]]
    logs = []
    meta = reduce_embedder(repo, dim=16, fit_paths=fit, progress=logs.append)
    v2 = repo / "embedder" / "2"
    assert meta["version"] == 2 and meta["dim"] == 16 and meta["id"] == f"{src_meta['id']}-pca16"
    assert meta["reduction"]["source_version"] == 1 and meta["reduction"]["source_sha256"] == src_meta["model_sha256"]
    assert 0 < meta["reduction"]["variance_kept"] < 1 and meta["parity_max_abs_diff"] < 1e-4
    assert json.loads((v2 / "meta.json").read_text())["model_sha256"] == sha256_file(v2 / "model.onnx")
    # The config now lets versions differ in dimension, and still checks against either version.
    config = repo / "embedder" / "config.pbtxt"
    assert "dims: [ -1 ]" in config.read_text()
    cfg = DEFAULT_CONFIG
    check_config(config, replace(cfg, size=src_meta["input_size"]), 16, src_meta.get("regions"))
    check_config(config, replace(cfg, size=src_meta["input_size"]), src_meta["dim"], src_meta.get("regions"))

    # Idempotent: an up-to-date reduction is kept (not refitted, not rewritten).
    stamp = (v2 / "model.onnx").stat().st_mtime_ns
    assert reduce_embedder(repo, dim=16, fit_paths=fit, progress=logs.append) == meta
    assert (v2 / "model.onnx").stat().st_mtime_ns == stamp and "up to date" in logs[-1]
    # A folder holding some other model is never overwritten; a bad dimension is refused.
    other = tmp_path / "other"
    source_repo(model_repo, other)
    (other / "embedder" / "2").symlink_to((repo / "embedder" / "1").resolve())
    with pytest.raises(FileExistsError, match="not a reduction"):
        reduce_embedder(other, source_version=1, dim=16, fit_paths=fit)
    with pytest.raises(ValueError, match="cannot reduce"):
        reduce_embedder(repo, source_version=1, dim=src_meta["dim"], fit_paths=fit)
    # A folder a failed run left empty does not block the next run.
    empty = tmp_path / "empty"
    source_repo(model_repo, empty)
    (empty / "embedder" / "2").mkdir()
    assert reduce_embedder(empty, dim=8, fit_paths=fit[:12], progress=logs.append)["version"] == 2


@pytest.fixture
def reduced_repo(model_repo, grocery, tmp_path):
    from visearch.modeling.reduce import reduce_embedder

    repo = source_repo(model_repo, tmp_path / "repo")
    reduce_embedder(repo, dim=32, fit_paths=[p.path for p in grocery["train"][::40][:64]], progress=lambda m: None)
    return repo


def test_embedding_service_serves_each_version_with_its_own_dimension(services, reduced_repo, grocery):
    services.env["VISEARCH_MODEL_REPOSITORY"] = str(reduced_repo)
    addr = services.start("embedding")
    milk = [p for p in grocery["train"] if p.fine_name == "Arla-Standard-Milk"][:2]
    oat = next(p for p in grocery["train"] if p.fine_name == "Oatly-Oat-Milk")
    items = [embedding_pb2.EmbedItem(image=p.path.read_bytes()) for p in [*milk, oat]]
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        info = stub.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=10).model
        assert (info.version, info.dim) == ("2", 32), "the reduction is the newest version: served by default"
        new = stub.Embed(embedding_pb2.EmbedRequest(items=items), timeout=30)
        old = stub.Embed(embedding_pb2.EmbedRequest(items=items, model_version="1"), timeout=30)
    v2 = np.array([e.values for e in new.embeddings])
    v1 = np.array([e.values for e in old.embeddings])
    assert new.model.version == "2" and new.model.dim == 32 and v2.shape == (3, 32)
    assert old.model.version == "1" and v1.shape[1] > 32
    assert np.allclose(np.linalg.norm(v2, axis=1), 1, atol=1e-4)
    # The reduced descriptor keeps the source's neighbourhoods: same product closer than another.
    assert v2[0] @ v2[1] > v2[0] @ v2[2] and v1[0] @ v1[1] > v1[0] @ v1[2]
    # Regions come from the same feature map in both versions (the projection touches only the descriptor).
    with channel(addr) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        r2 = stub.Embed(embedding_pb2.EmbedRequest(items=items[:1], regions=True), timeout=30).embeddings[0].regions
        r1 = stub.Embed(embedding_pb2.EmbedRequest(items=items[:1], regions=True, model_version="1"),
                        timeout=30).embeddings[0].regions
    assert np.allclose(r1.query, r2.query, atol=1e-5) and len(r1.boxes) == len(r2.boxes)


def test_models_reduce_command(model_repo, grocery, tmp_path):
    """The CLI contract: writes the next version and prints its record; a bad request is a clear error."""
    from click.testing import CliRunner

    from visearch import cli

    repo = source_repo(model_repo, tmp_path / "repo")
    src_dim = json.loads((repo / "embedder" / "1" / "meta.json").read_text())["dim"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    bad = CliRunner(env=env).invoke(cli.main, ["models", "reduce", "--repo", str(repo), "--dim", str(src_dim)])
    assert bad.exit_code != 0 and "cannot reduce" in bad.output
    assert not (repo / "embedder" / "2").exists()
    ok = CliRunner(env=env).invoke(cli.main, ["models", "reduce", "--repo", str(repo), "--dim", "8", "--fit-photos", "24"])
    assert ok.exit_code == 0, ok.output
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    assert record["version"] == 2 and record["dim"] == 8 and record["reduction"]["fitted_on"].startswith("24 photos")
    assert json.loads((repo / "embedder" / "2" / "meta.json").read_text())["dim"] == 8


def test_a_packed_basis_rebuilds_the_same_graph_and_only_for_its_own_source(model_repo, grocery, tmp_path):
    """A first build takes the served PCA from params/ instead of embedding every train photo: the
    reduced graph it writes is the fitted one byte for byte; a basis packed for another source model
    (or altered) is not used."""
    from visearch import packs
    from visearch.modeling.reduce import pack_name, pack_reduction, packed_basis, reduce_embedder

    repo = source_repo(model_repo, tmp_path / "repo")
    fitted = reduce_embedder(repo, dim=16, fit_paths=[p.path for p in grocery["train"][::50][:40]],
                             progress=lambda m: None)
    params = tmp_path / "params"
    pack = params / pack_name("embedder", 16)
    digest = pack_reduction(repo / "embedder" / "2", pack)
    assert (params / packs.SUMS).read_text() == f"{digest}  {pack.name}\n"

    again = source_repo(model_repo, tmp_path / "again")
    logs = []
    meta = reduce_embedder(again, dim=16, progress=logs.append, params=params)
    assert meta["model_sha256"] == fitted["model_sha256"], "the same basis in the same graph: the same file"
    assert meta["reduction"]["fitted_on"] == fitted["reduction"]["fitted_on"]
    assert meta["reduction"]["basis_from"] == packs.provenance(pack) and any("from " + pack.name in m for m in logs)
    assert not any("embedded" in m for m in logs), "no fit photos embedded beyond the parity check"
    # Packing a version that was itself built from a pack gives the same pack back.
    assert pack_reduction(again / "embedder" / "2", tmp_path / "again.npz") and \
        packs.read_pack(tmp_path / "again.npz")[1] == packs.read_pack(pack)[1]
    assert np.array_equal(packs.read_pack(tmp_path / "again.npz")[0]["reference_outputs"],
                          packs.read_pack(pack)[0]["reference_outputs"])

    with pytest.raises(packs.PackError, match="fitted on the model"):
        packed_basis(pack, "0" * 64, 16)
    with pytest.raises(packs.PackError, match="PCA 16"):
        packed_basis(pack, fitted["reduction"]["source_sha256"], 32)
    pack.write_bytes(pack.read_bytes() + b"\0")
    with pytest.raises(packs.PackError, match="SHA256SUMS records"):
        packed_basis(pack, fitted["reduction"]["source_sha256"], 16)


def _resaved_source(model_repo, dst, change):
    """source_repo's repository with version 1 a real folder: the served plain version's ONNX file
    loaded, changed in place by `change` and saved again, its meta.json recording the new sha256."""
    import onnx

    from visearch.checksum import sha256_file

    repo = source_repo(model_repo, dst)
    v1 = repo / "embedder" / "1"
    plain = v1.resolve()
    v1.unlink()
    v1.mkdir()
    model = onnx.load(str(plain / "model.onnx"))
    change(model)
    onnx.save(model, str(v1 / "model.onnx"))
    meta = dict(json.loads((plain / "meta.json").read_text()), model_sha256=sha256_file(v1 / "model.onnx"))
    (v1 / "meta.json").write_text(json.dumps(meta))
    return repo, meta


def test_a_packed_basis_serves_a_source_of_the_same_function_whatever_its_bytes(model_repo, grocery, tmp_path):
    """An export's bytes move with the machine (its region outputs are fitted through multi-threaded
    float sums) while its descriptor does not: a pack records its source's descriptors of reference
    images made in code and serves any source file that gives them back (re-serialised: other
    metadata, another initializer order); a source of another function (weights moved) is refused,
    and a pack without reference outputs serves only its exact file."""
    import onnx
    from onnx import numpy_helper

    from visearch import packs
    from visearch.modeling.reduce import REFERENCE_IMAGES, pack_name, pack_reduction, packed_basis, reduce_embedder

    repo = source_repo(model_repo, tmp_path / "repo")
    fitted = reduce_embedder(repo, dim=16, fit_paths=[p.path for p in grocery["train"][::50][:40]],
                             progress=lambda m: None)
    pack = tmp_path / "params" / pack_name("embedder", 16)
    pack_reduction(repo / "embedder" / "2", pack)
    arrays, record = packs.read_pack(pack)
    src_dim = json.loads((repo / "embedder" / "1" / "meta.json").read_text())["dim"]
    assert arrays["reference_outputs"].shape == (REFERENCE_IMAGES, src_dim)
    assert record["reference"]["images"] == REFERENCE_IMAGES and record["source_sha256"] == fitted["reduction"]["source_sha256"]

    def resave(model):  # the same graph and weights, serialised otherwise
        model.producer_version += "+resaved"
        model.doc_string += " (re-saved by a test)"
        onnx.helper.set_model_props(model, {"resaved_by": "tests/test_reduce.py"})
        inits = list(model.graph.initializer)[::-1]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)

    same, same_meta = _resaved_source(model_repo, tmp_path / "same", resave)
    assert same_meta["model_sha256"] != fitted["reduction"]["source_sha256"]
    logs = []
    meta = reduce_embedder(same, dim=16, progress=logs.append, params=pack.parent)
    assert meta["reduction"]["basis_from"] == packs.provenance(pack) and "same function" in meta["reduction"]["basis_check"]
    assert meta["reduction"]["source_sha256"] == same_meta["model_sha256"] and meta["parity_max_abs_diff"] < 1e-4
    assert not any("fitting" in m or "embedded" in m for m in logs), logs
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(same / "embedder" / "2" / "model.onnx")).graph.initializer}
    assert np.array_equal(got["pca_weight"], arrays["weight"]) and np.array_equal(got["pca_bias"], arrays["bias"])

    def move(model):  # every weight matrix and kernel moved by 1 % of its spread: another function
        rng = np.random.default_rng(0)  # (whichever model the repository serves: fine-tuned or off the shelf)
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.ndim >= 2 and not init.name.startswith("pca_"):
                w = w + 0.01 * w.std() * rng.standard_normal(w.shape).astype(w.dtype)
                init.CopyFrom(numpy_helper.from_array(w, init.name))

    other, other_meta = _resaved_source(model_repo, tmp_path / "other", move)
    with pytest.raises(packs.PackError, match=r"fitted on the model .*reference images differ by"):
        packed_basis(pack, other_meta["model_sha256"], 16, source_model=other / "embedder" / "1" / "model.onnx",
                     source_meta=other_meta)

    # A pack without reference outputs serves only the very file it was fitted on.
    legacy = tmp_path / "legacy" / pack.name
    packs.write_pack(legacy, {"weight": arrays["weight"], "bias": arrays["bias"]},
                     {k: v for k, v in record.items() if k != "reference"})
    with pytest.raises(packs.PackError, match="no reference outputs"):
        packed_basis(legacy, same_meta["model_sha256"], 16, source_model=same / "embedder" / "1" / "model.onnx",
                     source_meta=same_meta)
    assert packed_basis(legacy, fitted["reduction"]["source_sha256"], 16)[3] == "its very model file"
