"""Generate the gRPC stubs from protos/ into server/_gen (never edited by hand).

Run by deploy/setup.sh (`python -m server.protogen`) and, if the stubs are missing
or older than their .proto files, on first import of server.rpc."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT = Path(__file__).resolve().parent / "_gen"
PROTOS = ("transplant/v1/inference.proto", "transplant/v1/admin.proto")


def stale() -> bool:
    newest = max((PROTO_DIR / p).stat().st_mtime for p in PROTOS)
    outs = list(OUT.rglob("*_pb2*.py"))
    return len(outs) < 2 * len(PROTOS) or min(o.stat().st_mtime for o in outs) < newest


def generate() -> None:
    from grpc_tools import protoc
    import grpc_tools

    OUT.mkdir(exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}"] + [str(PROTO_DIR / p) for p in PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
    # generated code imports `transplant.v1.x_pb2`; make it package-relative
    for f in OUT.rglob("*.py"):
        text = re.sub(r"^from transplant\.v1 import", "from server._gen.transplant.v1 import", f.read_text(), flags=re.M)
        f.write_text(text)
    for d in [OUT, OUT / "transplant", OUT / "transplant" / "v1"]:
        (d / "__init__.py").touch()


if __name__ == "__main__":
    generate()
    print(f"generated stubs for {', '.join(PROTOS)} in {OUT}", file=sys.stderr)
