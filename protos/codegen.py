"""Regenerates the committed Python code beside each .proto in protos/ (`make protos`).

The contracts are shared by every layer (the control plane stores ExecutionPlans, the
servicers speak them), so their code lives with them in the `protos` package rather
than inside one layer.

grpc_tools writes imports as `from planengine.v1 import x_pb2`, i.e. relative to
the proto root; they are rewritten to this package so the generated modules
import without touching sys.path. tests/protos/test_protos.py fails when the committed
files differ from a fresh generation.
"""

from __future__ import annotations

import re
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # protos/: the .proto files and, beside them, their Python code
ROOT = PROTO_ROOT.parent
OUT = PROTO_ROOT
PACKAGE = "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (python, pyi, grpc) for every proto into `out`; returns the written files."""
    from grpc_tools import protoc
    include = str(files("grpc_tools") / "_proto")
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for path in sorted(out.rglob("*_pb2*.py*")):
        text = path.read_text()
        text = re.sub(r"^from planengine\.v1 import", f"from {PACKAGE}.planengine.v1 import", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for pkg in {p.parent for p in written} | {out / "planengine"}:
        (pkg / "__init__.py").touch()
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = OUT / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            print(target.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
