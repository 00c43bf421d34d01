"""The checked-in protocol stubs are exactly what the pinned generator makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_stubs_match_proto_source(tmp_path: Path) -> None:
    gen = _gen_proto()
    try:
        installed = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:  # it is in the dev extra: a missing one is a broken test install
        pytest.fail(f"grpcio-tools is not installed: pip install -e '.[dev]' (it pins {gen.GRPCIO_TOOLS_VERSION})")
    if installed != gen.GRPCIO_TOOLS_VERSION:
        pytest.fail(f"grpcio-tools {installed} installed; the stubs are pinned to {gen.GRPCIO_TOOLS_VERSION}")
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.GENERATED)
    stale = gen.drift(tmp_path)
    assert not stale, f"stale stubs {stale}: run python scripts/gen_proto.py and commit the result"
    # imports point at the package, not at protoc's proto-tree path
    grpc_stub = (tmp_path / "fleet_pb2_grpc.py").read_text()
    assert "from fwdfleet.protocol.v1 import fleet_pb2" in grpc_stub
    assert "from fwdfleet.v1 import" not in grpc_stub


def test_drift_is_detected(tmp_path: Path) -> None:
    gen = _gen_proto()
    for name in gen.GENERATED:
        (tmp_path / name).write_bytes((gen.PACKAGE_DIR / name).read_bytes())
    assert gen.drift(tmp_path) == []
    target = tmp_path / "fleet_pb2.pyi"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    assert gen.drift(tmp_path) == ["fleet_pb2.pyi"]


def test_service_table_matches_generated_descriptor() -> None:
    from fwdfleet.protocol import rpc

    rpc.check_service_matches_stubs()


def test_generated_code_declares_its_protobuf_floor() -> None:
    """pyproject's protobuf minimum must be at least the runtime the generated code validates against."""
    text = (ROOT / "fwdfleet" / "protocol" / "v1" / "fleet_pb2.py").read_text()
    line = next(x for x in text.splitlines() if x.startswith("# Protobuf Python Version:"))
    major, minor, patch = (int(p) for p in line.split(":")[1].strip().split("."))
    import google.protobuf

    have = tuple(int(p) for p in google.protobuf.__version__.split(".")[:3])
    assert have >= (major, minor, patch)
