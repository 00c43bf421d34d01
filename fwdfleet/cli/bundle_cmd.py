"""``fwdfleet bundle``: inspect and verify bundles, zip them for copying to a device."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fwdfleet.bundle import load_bundle, zip_bundle


def register(sub: Any) -> None:
    p = sub.add_parser("bundle", help="inspect, verify or zip a bundle", description=__doc__)
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    inspect = bsub.add_parser(
        "inspect",
        help="print a bundle's manifest and verify its checksums",
        description="Print a bundle's manifest (kind, trainables, graphs, labels) and verify every checksum.",
    )
    inspect.add_argument("path", help="bundle folder or .zip")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(func=_inspect)

    zp = bsub.add_parser("zip", help="verify a bundle and write it as one .zip file")
    zp.add_argument("path", help="bundle folder")
    zp.add_argument("out", help="output .zip path")
    zp.set_defaults(func=_zip)


def _inspect(args: argparse.Namespace) -> int:
    b = load_bundle(args.path, verify=True)
    m = b.manifest
    if args.json:
        print(json.dumps({"path": str(b.path), "verified": True, "manifest": json.loads(m.to_json())}, indent=2))
        return 0
    print(f"bundle     {b.path}")
    print(f"kind       {m.kind}   schema {m.schema_version}   fwdfleet {m.toolkit_version}")
    print(f"quantized  {m.quantization or 'no (fp32)'}   opset {m.opset}")
    if m.labels:
        print(f"labels     {', '.join(m.labels)}")
    if m.tokenizer:
        print(f"tokenizer  {', '.join(m.tokenizer.files)} (max_length {m.tokenizer.max_length})")
    print(f"trainable  {len(m.trainables)} tensors, {m.num_trainable:,} values")
    for t in m.trainables:
        print(f"  {t.name:<60} {t.dtype:<8} {list(t.shape)}")
    for g in m.graphs:
        print(f"graph {g.name!r} ({g.file})")
        for t in g.data_inputs:
            print(f"  in  {t.name:<24} {t.dtype:<8} {list(t.shape)}")
        print(f"  in  ({len(g.trainables)} trainable tensors)")
        for t in g.outputs:
            print(f"  out {t.name:<24} {t.dtype:<8} {list(t.shape)}")
    print(f"checksums  {len(m.files)} files verified")
    return 0


def _zip(args: argparse.Namespace) -> int:
    out = zip_bundle(load_bundle(args.path, verify=True), args.out)
    print(f"wrote {out}")
    return 0
