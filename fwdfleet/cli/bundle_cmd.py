"""``fwdfleet bundle``: inspect and verify bundles, zip them for copying to a device, make NPU-ready copies."""

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

    ev = bsub.add_parser(
        "eval", help="score a bundle's trainables on labelled data: accuracy, macro-F1, per class, confusion",
        description="Evaluate a bundle (e.g. a run's final/ or best/) on a data file or folder: loss, accuracy, "
                    "macro-F1, per-class precision/recall/F1 and the confusion matrix, computed with numpy in "
                    "the base install (scikit-learn's definitions). Text labels are matched to the bundle's "
                    "label map by name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_args(ev)
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(func=_eval)

    pr = bsub.add_parser(
        "predict", help="write a bundle's prediction for every example of a data file as CSV",
        description="Predict every example of a data file with a bundle's trainables and write a CSV: row, "
                    "predicted class, its probability, and the true class when the data has labels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_args(pr)
    pr.add_argument("--out", required=True, help="CSV file to write the predictions to")
    pr.set_defaults(func=_predict)

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

    qs = bsub.add_parser(
        "quantize-static", help="make an NPU-ready copy: fixed shapes, QDQ-quantized, calibrated on the device's data",
        description="Write a copy of an fp32 bundle for integer NPUs (Qualcomm HTP, Intel NPU): the data inputs "
                    "get fixed sizes and every operator is wrapped in QuantizeLinear/DequantizeLinear pairs "
                    "(8-bit weights, 8- or 16-bit activations) whose scales are calibrated on batches of --data "
                    "at the current and perturbed trainable values. Trainables stay float graph inputs.",
    )
    qs.add_argument("path", help="the fp32 bundle (folder or .zip)")
    qs.add_argument("out", help="folder for the static bundle")
    qs.add_argument("--data", required=True, help="calibration data: IDX folder or file, .csv, .npz (the device's)")
    qs.add_argument("--split", default="train", help="IDX split prefix inside a folder (default: %(default)s)")
    qs.add_argument("--label-column", default="label", help="CSV label column (default: %(default)s)")
    qs.add_argument("--activation-bits", type=int, choices=(8, 16), default=16, help="(default: %(default)s)")
    qs.add_argument("--batch-size", type=int, default=16, help="the fixed batch size (default: %(default)s)")
    qs.add_argument("--sequence-length", type=int, help="the fixed sequence length (text bundles)")
    qs.add_argument("--calibration-batches", type=int, default=8, help="(default: %(default)s)")
    qs.add_argument("--calibration-points", type=int, default=4,
                    help="trainable points per batch: w, then w + spread * z (default: %(default)s)")
    qs.add_argument("--trainable-spread", type=float, default=0.05,
                    help="scale of the calibration perturbations of the trainables (default: %(default)s)")
    qs.add_argument("--float-trainables", action="store_true",
                    help="leave the operators reading a trainable in float (they run on the CPU of an integer NPU)")
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--overwrite", action="store_true")
    qs.add_argument("--json", action="store_true", help="print the manifest's static_quantization record as JSON")
    qs.set_defaults(func=_quantize_static)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle folder or .zip (e.g. a run's final/ bundle)")
    p.add_argument("--data", required=True, help="IDX folder or images file, .csv, .tsv/.txt of label<TAB>text, .npz")
    p.add_argument("--split", default="train", help="IDX split prefix inside a folder (train, t10k)")
    p.add_argument("--label-column", default="label", help="CSV label column")
    p.add_argument("--batch-size", type=int, default=256, help="examples per onnxruntime call")


def _scored(args: argparse.Namespace) -> Any:
    from fwdfleet.device_runtime.data import load_dataset
    from fwdfleet.device_runtime.session import BundleSession
    from fwdfleet.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    bundle = load_bundle(args.path, verify=True)
    data = load_dataset(args.data, bundle, split=args.split, label_column=args.label_column)
    return bundle, BundleSession(bundle), data


def _eval(args: argparse.Namespace) -> int:
    from fwdfleet.device_runtime.train import evaluate

    bundle, session, data = _scored(args)
    ev = evaluate(session, bundle.load_trainables(), data.batches(args.batch_size))
    labels = bundle.manifest.labels
    if args.json:
        print(json.dumps({"bundle": str(bundle.path), "data": args.data, **ev.to_json(labels)}, indent=2))
        return 0
    print(f"bundle {bundle.path} on {args.data}: {ev.examples:,} examples, mean loss {ev.loss:.4f}")
    if ev.classification is not None:
        print(ev.classification.format(labels))
    else:
        print("no accuracy: the graph has no logits or the data no labels")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from fwdfleet.device_runtime.train import scored_batches
    from fwdfleet.errors import ConfigError

    bundle, session, data = _scored(args)
    if "logits" not in session.output_names:
        raise ConfigError(f"bundle kind {bundle.manifest.kind!r} has no logits output to predict classes from")
    names = bundle.manifest.labels
    row = 0
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["row", "predicted", "probability", "label"])
        for batch, scores in scored_batches(session, bundle.load_trainables(), data.batches(args.batch_size)):
            logits = np.asarray(scores["logits"], dtype=np.float64)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            prob = z / z.sum(axis=1, keepdims=True)
            pred = prob.argmax(axis=1)
            true = batch.get("labels")
            for i, p in enumerate(pred):
                label = "" if true is None else _name(names, int(true[i]))
                out.writerow([row, _name(names, int(p)), f"{prob[i, p]:.4f}", label])
                row += 1
    print(f"wrote {row:,} predictions to {args.out}")
    return 0


def _name(names: tuple[str, ...] | list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


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


def _quantize_static(args: argparse.Namespace) -> int:
    from fwdfleet.device_runtime.data import load_dataset
    from fwdfleet.errors import ConfigError
    from fwdfleet.export.quantize import StaticQuantConfig, calibration_batches, quantize_static_bundle

    try:
        config = StaticQuantConfig(
            activation_bits=args.activation_bits, batch_size=args.batch_size, sequence_length=args.sequence_length,
            calibration_batches=args.calibration_batches, calibration_points=args.calibration_points,
            trainable_spread=args.trainable_spread, quantize_trainables=not args.float_trainables, seed=args.seed,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    bundle = load_bundle(args.path, verify=True)
    data = load_dataset(args.data, bundle, split=args.split, label_column=args.label_column)
    out = quantize_static_bundle(bundle, args.out, config, calibration_batches(data, config), overwrite=args.overwrite)
    record = out.manifest.settings["static_quantization"]
    if args.json:
        print(json.dumps({"bundle": str(out.path), "quantization": out.manifest.quantization, **record}, indent=2))
    else:
        nodes = sum(g["quantize_linear_nodes"] for g in record["graphs"].values())
        print(f"wrote {out.path} ({out.manifest.quantization}, batch {config.batch_size}; {nodes} QuantizeLinear "
              f"nodes over {len(record['graphs'])} graph(s); calibrated on {record['calibration_examples']} examples)")
    return 0
