"""The committed stubs are exactly what protoc makes from protos/ (one generated package, no drift)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.generate(tmp_path)
    assert len(files) == 18  # 5 service protos + the TensorFlow GraphDef subset, 3 files each
    stale = [str(f.relative_to(tmp_path)) for f in files
             if (ROOT / f.relative_to(tmp_path)).read_bytes() != f.read_bytes()]
    assert not stale, f"regenerate with `make protos`: {stale}"


def test_versioned_packages_match_folders():
    for proto in (ROOT / "protos").rglob("*.proto"):
        rel = proto.parent.relative_to(ROOT / "protos")
        assert f"package {'.'.join(rel.parts)};" in proto.read_text(), proto
