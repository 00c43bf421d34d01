"""``fwdfleet export``: write a bundle a torch-free device can train.

Each subcommand names an export kind of the registry (``fwdfleet.export.kinds``) and how to
build its config from the arguments; :func:`run_export` does the rest for every kind. torch,
transformers and peft are imported only when a kind that needs them runs, so ``fwdfleet
--help`` works on a device install; without them an export fails with one line that says what
to install. ``mlp`` and ``ff-mlp`` need no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fwdfleet.errors import ExportError

QUANTIZE_CHOICES = ("none", "int8", "int8-weight", "int4-weight")
# kept in step with export.hf.PEFT_METHODS / ENCODER_METHODS (not imported: torch-free --help)
LM_METHODS = ("lora", "bitfit", "lora+bitfit")
ENCODER_METHODS = (*LM_METHODS, "adapter", "adapter+bitfit", "ia3")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "tanh")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a model to a bundle (seq-cls/causal-lm need the export extra)",
        description="Export a model to a bundle: model.onnx with frozen weights as initializers and "
                    "every trainable tensor as a named graph input, manifest.json, initial trainable "
                    "values and the tokenizer. Every export is checked against a reference before the "
                    "bundle is written. seq-cls and causal-lm need: pip install torch==2.13.0 && pip "
                    "install 'fwdfleet[export]'; mlp and ff-mlp need no torch.",
    )
    esub = p.add_subparsers(dest="export_kind", metavar="KIND", required=True)

    sc = esub.add_parser(
        "seq-cls", help="LoRA/adapter/IA3/BitFit sequence classifier from a local BERT-family folder",
        description="LoRA (peft), bottleneck-adapter, IA3 (peft) or BitFit sequence classifier: encoder + "
                    "mean pooling + linear head. Outputs logits, per-sample loss and pooled features. --method adapter "
                    "inserts h + up(act(down(h))) after each layer's feed-forward output dense (BERT, "
                    "RoBERTa, XLM-R, ELECTRA), up starting at zero so the initial model is the frozen one.",
    )
    sc.add_argument("model", help="local Hugging Face encoder folder (config.json, weights, tokenizer)")
    lab = sc.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help="comma-separated class names, e.g. World,Sports,Business,Sci/Tech")
    lab.add_argument("--num-labels", type=int, help="number of classes (named 0..N-1)")
    sc.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="feature pooling (default mean)")
    sc.add_argument("--max-length", type=int, default=128, help="tokenizer max length (default 128)")
    _method(sc, ENCODER_METHODS, head=True)
    sc.add_argument("--adapter-size", type=int,
                    help="bottleneck width r of --method adapter: down hidden->r, up r->hidden (default 16)")
    sc.add_argument("--adapter-layers",
                    help="comma-separated encoder layer indices that get an adapter (default: every layer)")
    sc.add_argument("--adapter-activation", choices=ADAPTER_ACTIVATIONS,
                    help="activation between down and up of --method adapter (default relu)")
    _common(sc)
    sc.set_defaults(func=run_export, kind="seq_cls_lora", make_config=_seq_cls_config)

    lm = esub.add_parser(
        "causal-lm", help="LoRA causal LM from a local Llama or GPT-2 folder or a .gguf file",
        description="LoRA causal language model; per-sample mean next-token loss with padding masked. "
                    "A folder with config.json and a tokenizer but no weights exports with --random-init. "
                    "A .gguf file (llama.cpp) is dequantized to float32 and exported like a folder.",
    )
    lm.add_argument("model", help="local Hugging Face Llama or GPT-2 folder, or a Llama/GPT-2 .gguf file")
    lm.add_argument("--max-length", type=int, default=256, help="tokenizer max length (default 256)")
    lm.add_argument("--objective", choices=("lm", "response", "prompted-cls"), default="lm",
                    help="lm: next-token loss on every token; response: only on the response's tokens (input "
                    "loss_mask; the prompt is context); prompted-cls: a template and one label word per class, "
                    "cross-entropy over the label words' scores at the answer position (default lm)")
    lm.add_argument("--template", default="",
                    help="prompted-cls: the prompt with one {text} slot, ending where the label word follows, "
                    "e.g. 'Article: {text}\\nAnswer:' (\\n is a newline)")
    lm.add_argument("--label-words", default="",
                    help="prompted-cls: comma-separated label words, one token each, e.g. ' World, Sports' "
                    "(a leading space is kept: most tokenizers have space-prefixed word tokens)")
    lm.add_argument("--labels", default="", help="prompted-cls: comma-separated class names (default: the words)")
    lm.add_argument("--trainable-layers", type=int, default=None,
                    help="LoRA in the top N decoder layers only, and a split bundle: a frozen prefix graph a "
                    "device runs once per example and caches, and a suffix graph every probe runs (Llama)")
    _method(lm, LM_METHODS, head=False)
    _common(lm)
    lm.set_defaults(func=run_export, kind="causal_lm_lora", make_config=_causal_lm_config)

    mlp = esub.add_parser(
        "mlp", help="a plain MLP classifier, every weight trainable (BAFFLE's small model)",
        description="A tanh MLP classifier with all weights as graph inputs: logits and per-sample loss. "
                    "Trained from scratch by seeds and scalars (fwdfleet demo uses it). Needs no torch.",
    )
    mlp.add_argument("--layers", default="64,32,10", help="sizes from input to classes (default 64,32,10)")
    mlp.add_argument("--labels", help="comma-separated class names (default 0..N-1)")
    mlp.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    mlp.add_argument("--opset", type=int, default=18)
    mlp.add_argument("--builder", choices=("onnx", "torch"), default="onnx",
                     help="write the graph with onnx.helper (no torch needed) or trace it with torch; "
                          "same bundle either way (default onnx)")
    mlp.add_argument("--out", "-o", required=True, help="bundle folder to write (must be new or empty)")
    mlp.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    mlp.add_argument("--json", action="store_true")
    mlp.set_defaults(func=run_export, kind="mlp", make_config=_mlp_config)

    st = esub.add_parser(
        "stack", help="add a stacked graph: several perturbed points per onnxruntime call",
        description="Add graph 'model_stack' to an existing bundle: its trainable inputs carry a leading "
                    "axis of P points and its loss is (P, batch), so the device's estimator evaluates P "
                    "perturbed points per call (`fwdfleet device bench/memory --train-graph model_stack`). "
                    "Fixed shapes; costs P times the activations. Built from the bundle's torch twin with "
                    "torch.vmap and checked against the bundle's own graph.",
    )
    st.add_argument("bundle", help="bundle folder to add the graph to (its manifest is rewritten)")
    st.add_argument("--points", "-p", type=int, required=True, help="points per call, P >= 2")
    st.add_argument("--batch-size", type=int, required=True, help="the graph's fixed batch size")
    st.add_argument("--sequence-length", type=int, help="fixed sequence length (token inputs)")
    st.add_argument("--opset", type=int, default=18)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_run_stack)

    try:
        from fwdfleet.cli.export_ff_cmd import register_ff
    except ImportError:
        pass
    else:
        register_ff(esub)


def _method(p: argparse.ArgumentParser, choices: tuple[str, ...], *, head: bool) -> None:
    adapter = (", adapter: bottleneck adapters (see --adapter-size), ia3: (IA)^3 scaling vectors of keys, "
               "values and the feed-forward output" if "adapter" in choices else "")
    besides = " besides the head" if head else ""
    p.add_argument("--method", choices=choices, default="lora",
                   help=f"what is trained{besides}: lora: LoRA matrices (see --rank), bitfit: "
                        f"the biases{adapter}; <method>+bitfit also trains the biases (default lora)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--target-modules", help="comma-separated LoRA target modules (default: the family's q/v)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="quantize frozen weights: int8 (dynamic), int8-weight / int4-weight (MatMulNBits; "
                        "best for perturbed training); trainables stay float (default none)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--batch-size", type=int, help="fix the batch size (default dynamic)")
    p.add_argument("--sequence-length", type=int, help="fix the sequence length (default dynamic)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch exporter (default dynamo; legacy is faster but specialises shapes)")
    p.add_argument("--random-init", action="store_true", help="random (seeded) weights instead of the folder's")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA/adapter/head init and random weights")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch parity check")
    p.add_argument("--json", action="store_true", help="print the export summary as JSON")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from fwdfleet.export.hf import LoraSettings
    from fwdfleet.export.onnx_graph import GraphOptions

    targets = tuple(t.strip() for t in args.target_modules.split(",")) if args.target_modules else None
    return {
        "method": args.method,
        "lora": LoraSettings(rank=args.rank, alpha=args.alpha, target_modules=targets),
        "max_length": args.max_length,
        "quantize": None if args.quantize == "none" else args.quantize,
        "graph": GraphOptions(opset=args.opset, batch_size=args.batch_size,
                              sequence_length=args.sequence_length, exporter=args.exporter),
        "seed": args.seed, "random_init": args.random_init, "verify": not args.no_verify,
    }


def run_export(args: argparse.Namespace) -> int:
    """Every kind's export: look the kind up in the registry, build its config, write, report."""
    from fwdfleet.export.kinds import get_kind

    kind = get_kind(args.kind)  # says what to install when the kind's packages are missing
    try:
        config = args.make_config(args)
    except ValueError as e:  # config dataclasses name the bad field
        raise ExportError(str(e)) from e
    result = kind.export(config, Path(args.out), overwrite=args.overwrite)
    return _report(args, result.summary())


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    q = summary["quantization"] or "fp32"
    print(f"wrote {summary['kind']} bundle {summary['bundle']} ({q}, {summary['bundle_bytes'] / 1e6:.1f} MB, "
          f"graphs {', '.join(summary['graphs'])}) in {summary['export_seconds']:.1f} s")
    print(f"trainable: {summary['trainable_tensors']} tensors, {summary['trainable_values']:,} values")
    if summary["parity_max_abs_diff"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in summary["parity_max_abs_diff"].items())
        print(f"fp32 parity vs the reference at shape {tuple(summary['parity_shape'])}: max |diff| {diffs}")
    else:
        print("parity check skipped (--no-verify)")
    if summary["quantized_max_abs_diff"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in summary["quantized_max_abs_diff"].items())
        print(f"{q} graph vs the fp32 reference: max |diff| {diffs} (measured, not a failure; "
              "recorded in manifest settings.quantized_max_abs_diff)")
    return 0


def _seq_cls_config(args: argparse.Namespace) -> Any:
    from fwdfleet.export.seq_cls import SeqClsExport

    if args.labels:
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    else:
        if args.num_labels < 2:
            raise ExportError(f"--num-labels must be >= 2, got {args.num_labels}")
        labels = tuple(str(i) for i in range(args.num_labels))
    return SeqClsExport(source=Path(args.model), labels=labels, pooling=args.pooling,
                        adapter=_adapter_settings(args), **_options(args))


def _adapter_settings(args: argparse.Namespace) -> Any:
    from fwdfleet.export.adapters import AdapterSettings

    given = [f"--adapter-{n}" for n in ("size", "layers", "activation")
             if getattr(args, f"adapter_{n}") is not None]
    if given and "adapter" not in args.method.split("+"):
        raise ExportError(f"{', '.join(given)} only apply to --method adapter or adapter+bitfit, "
                          f"not {args.method}")
    try:
        layers = (tuple(int(i) for i in args.adapter_layers.split(",") if i.strip())
                  if args.adapter_layers is not None else None)
    except ValueError as e:
        raise ExportError(f"--adapter-layers must be comma-separated integers, got {args.adapter_layers!r}") from e
    defaults = AdapterSettings()
    return AdapterSettings(
        size=defaults.size if args.adapter_size is None else args.adapter_size, layers=layers,
        activation=args.adapter_activation or defaults.activation,
    )


def _causal_lm_config(args: argparse.Namespace) -> Any:
    from fwdfleet.export.causal_lm import CausalLmExport

    words = tuple(w for w in args.label_words.split(",") if w.strip())
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    return CausalLmExport(source=Path(args.model), objective=args.objective,
                          template=args.template.replace("\\n", "\n"), label_words=words, labels=labels,
                          trainable_layers=args.trainable_layers, **_options(args))


def _mlp_config(args: argparse.Namespace) -> Any:
    from fwdfleet.export.onnx_mlp import MLPConfig

    try:
        sizes = tuple(int(v) for v in args.layers.split(","))
    except ValueError as e:
        raise ExportError(f"--layers must be comma-separated integers like 64,32,10, got {args.layers!r}") from e
    labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else ()
    return MLPConfig(layer_sizes=sizes, labels=labels, seed=args.seed, opset=args.opset, builder=args.builder)


def _run_stack(args: argparse.Namespace) -> int:
    from fwdfleet.export.hf import require_export_extra

    require_export_extra()
    from fwdfleet.export.stack import StackSettings, add_stacked_graph

    settings = StackSettings(points=args.points, batch_size=args.batch_size,
                             sequence_length=args.sequence_length, opset=args.opset)  # fmt: skip
    spec = add_stacked_graph(args.bundle, settings)
    summary = {"bundle": args.bundle, "graph": spec.name, "file": spec.file, "points": args.points,
               "inputs": {t.name: list(t.shape) for t in spec.inputs}}  # fmt: skip
    print(json.dumps(summary, indent=2) if args.json else
          f"added graph {spec.name!r} ({spec.file}) to {args.bundle}: {args.points} points per call, "
          f"batch {args.batch_size}; train with --train-graph {spec.name}")
    return 0
