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

    gen = bsub.add_parser(
        "generate", help="continue a prompt with a causal-LM bundle and its current trainables",
        description="Greedy (default) or sampled decoding with a causal-LM bundle, to see what fine-tuning "
                    "changed. Each token re-runs the sequence so far (no KV cache). Needs the text extra.",
    )
    gen.add_argument("path", help="bundle folder or .zip (e.g. a run's final/ bundle)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt, as the model reads it (\\n is a newline)")
    what.add_argument("--text", help="a text rendered into the bundle's prompt template (prompted-cls bundles)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--json", action="store_true", help="print prompt and continuation as JSON")
    gen.set_defaults(func=_generate)


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


def _generate(args: argparse.Namespace) -> int:
    from fwdfleet.device_runtime.data import PromptTemplate
    from fwdfleet.device_runtime.generate import GenerationSettings, generate
    from fwdfleet.errors import ConfigError

    bundle = load_bundle(args.path, verify=True)
    if args.text is not None:
        template = bundle.manifest.settings.get("template")
        if not isinstance(template, str) or not template:
            raise ConfigError("--text needs a bundle with a prompt template (export --objective prompted-cls); "
                              "give the whole prompt with --prompt")
        prompt = PromptTemplate(template).render(args.text)
    else:
        prompt = args.prompt.replace("\\n", "\n")
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    text = generate(bundle, prompt, settings)
    if args.json:
        print(json.dumps({"prompt": prompt, "continuation": text}))
    else:
        print(prompt + text)
    return 0


def _zip(args: argparse.Namespace) -> int:
    out = zip_bundle(load_bundle(args.path, verify=True), args.out)
    print(f"wrote {out}")
    return 0
