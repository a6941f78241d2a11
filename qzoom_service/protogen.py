"""Regenerate the Python code for `proto/qzoom/v1/*.proto` into the client package's
`clients/python/qzoom_client/_proto/`, the one copy: the server imports it too (qzoom-service depends on
qzoom-client, which depends on grpcio and protobuf only).

A development tool (needs grpcio-tools and a source checkout), not used at serving time:

    python -m qzoom_service.protogen            # rewrite the generated code in place

The generated files are committed; `tests/unit/test_proto_sync.py` regenerates into a temporary
directory and fails when they differ, i.e. when someone edited the .proto without running this.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

__all__ = ["PROTO_ROOT", "OUT_ROOT", "PACKAGE", "PROTO_FILES", "generate"]

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
OUT_ROOT = PROTO_ROOT.parent / "clients" / "python" / "qzoom_client" / "_proto"
PACKAGE = "qzoom_client._proto"  # the Python package OUT_ROOT is importable as
PROTO_FILES = ("qzoom/v1/qzoom.proto",)


def _command(out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]


def generate(out_dir: Path | str = OUT_ROOT, package: str = PACKAGE) -> list[Path]:
    """Run protoc into `out_dir` (the directory playing `package`); return the files written.

    protoc names imports after the proto path (`from qzoom.v1 import qzoom_pb2`), which only resolves
    with `_proto/` on sys.path; the gRPC stubs are rewritten to import through the package instead.
    The message classes' `__module__` is rewritten the same way: Ray pickles request and response
    messages by reference, which needs an importable module name (ray-project/ray#47347).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(_command(out_dir), check=True, cwd=PROTO_ROOT)
    written = []
    for proto in PROTO_FILES:
        pkg_dir = out_dir / Path(proto).parent
        # Every directory between out_dir and the generated modules must be a regular package.
        parts = Path(proto).parent.parts
        for depth in range(1, len(parts) + 1):
            init = out_dir.joinpath(*parts[:depth], "__init__.py")
            init.write_text("")
            written.append(init)
        stem = Path(proto).stem
        grpc_file = pkg_dir / f"{stem}_pb2_grpc.py"
        text = grpc_file.read_text()
        grpc_file.write_text(re.sub(r"^from (qzoom\.\S+) import ", rf"from {package}.\1 import ", text, flags=re.M))
        pb2_file = pkg_dir / f"{stem}_pb2.py"
        module = proto[: -len(".proto")].replace("/", ".") + "_pb2"
        pb2_file.write_text(pb2_file.read_text().replace(f"'{module}'", f"'{package}.{module}'"))
        written += [pb2_file, pkg_dir / f"{stem}_pb2.pyi", grpc_file]
    return sorted(set(written))


if __name__ == "__main__":
    for path in generate():
        print(path)
