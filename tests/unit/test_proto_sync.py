"""The committed generated code matches the .proto, and the .proto follows the contract's style:
a comment on every field and enum value, `_UNSPECIFIED` zero values."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

from qzoom_service import protogen

PROTO = protogen.PROTO_ROOT / "qzoom/v1/qzoom.proto"
_FIELD = re.compile(r"^\s*(?:optional\s+|repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+\w+\s*=\s*\d+\s*;")
_ENUM_VALUE = re.compile(r"^\s*[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;")


def _generated(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "qzoom").rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


def test_committed_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the `test` extra) regenerates the code")
    protogen.generate(tmp_path)
    fresh, committed = _generated(tmp_path), _generated(protogen.OUT_ROOT)
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `python -m qzoom_service.protogen`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    tools = importlib.metadata.version("grpcio-tools")
    assert not stale, (f"{stale} differ from a fresh protoc run (grpcio-tools {tools}; the committed code says"
                       " which version made it): run `python -m qzoom_service.protogen` and commit the result")


def test_generated_stubs_import_as_a_subpackage():
    from qzoom_client._proto.qzoom.v1 import qzoom_pb2, qzoom_pb2_grpc

    assert qzoom_pb2_grpc.qzoom_dot_v1_dot_qzoom__pb2 is qzoom_pb2
    assert qzoom_pb2.AnswerRequest.__module__ == "qzoom_client._proto.qzoom.v1.qzoom_pb2"  # pickled by reference
    assert set(qzoom_pb2.DESCRIPTOR.services_by_name["QZoomService"].methods_by_name) == {
        "UploadImage", "Answer", "ZoomRegion", "Health"}


def test_there_is_one_generated_copy_and_the_server_names_it():
    from qzoom_service.serve.app import SERVICER_FUNCTION

    package = protogen.PROTO_ROOT.parent / "qzoom_service"
    assert not (package / "_proto").exists(), "qzoom_service/_proto is gone: the server imports qzoom_client._proto"
    module, function = SERVICER_FUNCTION.rsplit(".", 1)
    assert module == "qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc" and function == "add_QZoomServiceServicer_to_server"
    assert callable(getattr(importlib.import_module(module), function))


def _lines_needing_comments() -> list[tuple[int, str, str]]:
    """(line number, line, previous non-blank line) for every field and enum value in the .proto."""
    out, prev = [], ""
    for n, line in enumerate(PROTO.read_text().splitlines(), 1):
        if _FIELD.match(line) or _ENUM_VALUE.match(line):
            out.append((n, line.strip(), prev))
        if line.strip():
            prev = line.strip()
    return out


def test_every_field_and_enum_value_has_a_comment_directly_above():
    missing = [f"line {n}: {line}" for n, line, prev in _lines_needing_comments() if not prev.startswith("//")]
    assert not missing, "fields without a comment line directly above:\n" + "\n".join(missing)
    unsentenced = [f"line {n}: {prev}" for n, _, prev in _lines_needing_comments() if not prev.rstrip().endswith(".")]
    assert not unsentenced, "field comments must be full sentences:\n" + "\n".join(unsentenced)


def test_the_comment_parser_sees_every_field_protoc_sees():
    from qzoom_client._proto.qzoom.v1 import qzoom_pb2

    def fields(messages):
        # map<K, V> fields are one line in the .proto; protoc adds a synthetic *Entry message for each.
        return sum(len(m.fields) + fields(m.nested_types) for m in messages if not m.GetOptions().map_entry)

    fd = qzoom_pb2.DESCRIPTOR
    expected = fields(fd.message_types_by_name.values()) + sum(len(e.values) for e in fd.enum_types_by_name.values())
    assert len(_lines_needing_comments()) == expected


def test_enums_start_with_unspecified_zero():
    from qzoom_client._proto.qzoom.v1 import qzoom_pb2

    for name, enum in qzoom_pb2.DESCRIPTOR.enum_types_by_name.items():
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED", name
        assert all(v.name.startswith(prefix + "_") for v in enum.values), name
