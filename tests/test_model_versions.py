"""A model change does not break existing catalogs: each catalog is searched and extended with the
model version that made its vectors, new catalogs get the new default, and versions never mix."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.test_mesh import cli, jsonl

pytestmark = pytest.mark.mesh


def test_catalogs_keep_their_model_version_across_a_model_change(model_repo, grocery, tmp_path):
    repo = tmp_path / "repo"
    for name in ("embedder", "detector"):
        (repo / name).mkdir(parents=True)
        shutil.copy(model_repo / name / "config.pbtxt", repo / name / "config.pbtxt")
    src = sorted((p for p in (model_repo / "embedder").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))[-1]
    (repo / "embedder" / "1").symlink_to(src.resolve())
    (repo / "detector" / "1").symlink_to((model_repo / "detector" / "1").resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(tmp_path / "data"), VISEARCH_MODEL_REPOSITORY=str(repo))
    photos = [p for p in grocery["train"] if p.is_product][::60][:10]
    query = next(p for p in grocery["val"] if p.fine_id == photos[0].fine_id).path
    manifest = tmp_path / "a.csv"
    manifest.write_text("item_id,path\n" + "".join(f"a{i},{p.path}\n" for i, p in enumerate(photos[:6])))
    more = tmp_path / "more.csv"
    more.write_text("item_id,path\n" + "".join(f"m{i},{p.path}\n" for i, p in enumerate(photos[6:])))

    def ingest(path, catalog):
        res = json.loads(cli(env, "ingest", "--manifest", str(path), "--catalog", catalog, "--wait", "--json").stdout)
        assert res["failed"] == 0, res

    def models():
        return {c["name"]: c["model"] for c in jsonl(cli(env, "catalogs").stdout)}

    cli(env, "up")
    try:
        ingest(manifest, "old")
        before = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json").stdout)[0]
        assert before["model"] == "embedder:1" and before["hits"]
    finally:
        cli(env, "down", check=False)

    (repo / "embedder" / "2").symlink_to(src.resolve())  # a new model version is deployed
    cli(env, "up")
    try:
        after = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json").stdout)[0]
        assert "error" not in after, after
        assert after["model"] == "embedder:1", "the old catalog is still searched with the version that made it"
        assert [h["item_id"] for h in after["hits"]] == [h["item_id"] for h in before["hits"]]
        ingest(more, "old")  # extending it embeds with its version too
        ingest(manifest, "new")  # a new catalog gets the new default
        assert models() == {"old": "embedder:1", "new": "embedder:2"}
        new = jsonl(cli(env, "search", str(query), "--catalog", "new", "--json").stdout)[0]
        assert new["model"] == "embedder:2" and new["hits"]
        assert {c["name"]: c["objects"] for c in jsonl(cli(env, "catalogs").stdout)}["old"] >= len(photos)
        # A version that is no longer deployed: a clear FAILED_PRECONDITION, not a mixed answer.
        (repo / "embedder" / "1").unlink()
        cli(env, "restart", "embedding")
        gone = jsonl(cli(env, "search", str(query), "--catalog", "old", "--json", check=False).stdout)[0]
        assert gone["error"]["code"] == "FAILED_PRECONDITION" and "version 1" in gone["error"]["message"], gone
    finally:
        cli(env, "down", check=False)
