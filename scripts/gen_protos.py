"""Regenerate the Python stubs of protos/ into the `visearch` package.

The stubs are committed so a plain `pip install` needs no protoc; the test suite
regenerates them into a temporary folder and fails on any difference.
Usage: python scripts/gen_protos.py [OUT_DIR]   (default: the repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every proto; returns the generated files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for rel in files:
        pkg = (out_dir / rel).parent
        # Package markers all the way down, so `import visearch.gateway.v1` works.
        for d in [pkg, *pkg.relative_to(out_dir).parents]:
            init = out_dir / d / "__init__.py"
            if d != Path(".") and not init.exists():
                init.write_text("")
        generated += sorted(pkg.glob(Path(rel).stem + "_pb2*"))
    return generated


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for f in generate(out):
        print(f.relative_to(out))
