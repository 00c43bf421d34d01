#!/usr/bin/env python3
"""Generate the Python stubs of the wire protocol from ``proto/`` (the only way they are made).

    python scripts/gen_proto.py            # regenerate fwdfleet/protocol/v1/*_pb2*.py[i] (fleet, pff)
    python scripts/gen_proto.py --check    # exit 1 if the checked-in stubs differ (drift)
    python scripts/gen_proto.py --out DIR  # write into DIR instead (used by the drift test)

The generator is pinned: stubs are produced by grpcio-tools ``GRPCIO_TOOLS_VERSION`` (its bundled
protoc), and this script refuses to run with another version, so that two machines produce
byte-identical files. The generated code requires a protobuf runtime at least as new as that
protoc (see the ``ValidateProtobufRuntimeVersion`` line in ``fleet_pb2.py``).

``protoc`` writes imports relative to the proto tree (``from fwdfleet.v1 import fleet_pb2``);
they are rewritten to the package path ``fwdfleet.protocol.v1``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"
ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ("fwdfleet/v1/fleet.proto", "fwdfleet/v1/pff.proto")
PACKAGE_DIR = ROOT / "fwdfleet" / "protocol" / "v1"
GENERATED = (
    "fleet_pb2.py", "fleet_pb2_grpc.py", "fleet_pb2.pyi",
    "pff_pb2.py", "pff_pb2_grpc.py", "pff_pb2.pyi",  # Pipeline Forward-Forward parameter store
)
_IMPORT = re.compile(r"^from fwdfleet\.v1 import ", re.MULTILINE)


def _check_pin() -> None:
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        sys.exit(f"gen_proto: grpcio-tools is not installed; pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}")
    if found != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"gen_proto: grpcio-tools {found} is installed but the stubs are pinned to "
            f"{GRPCIO_TOOLS_VERSION}; pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and return the generated files (imports rewritten)."""
    _check_pin()
    from grpc_tools import protoc  # imported after the pin check

    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpcio-tools
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_ROOT / f) for f in PROTO_FILES),
        ]
        code = protoc.main(args)
        if code != 0:
            sys.exit(f"gen_proto: protoc failed with exit code {code}")
        written = []
        for name in GENERATED:
            src = Path(tmp) / "fwdfleet" / "v1" / name
            text = _IMPORT.sub("from fwdfleet.protocol.v1 import ", src.read_text())
            dst = out_dir / name
            dst.write_text(text)
            written.append(dst)
    return written


def drift(out_dir: Path, reference: Path = PACKAGE_DIR) -> list[str]:
    """Names of the generated files in ``out_dir`` that differ from (or are missing in) ``reference``."""
    return [
        name
        for name in GENERATED
        if not (reference / name).is_file() or (reference / name).read_bytes() != (out_dir / name).read_bytes()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {PACKAGE_DIR})")
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are out of date")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            stale = drift(Path(tmp))
        if stale:
            print(f"gen_proto: stale stubs {stale}; run python scripts/gen_proto.py and commit", file=sys.stderr)
            return 1
        print("gen_proto: stubs are up to date")
        return 0
    for path in generate(args.out or PACKAGE_DIR):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
