"""``fwdfleet export ff-mlp``: write a Forward-Forward MLP bundle (graph ``model`` + one graph per layer).

``fwdfleet.cli.export_cmd`` calls :func:`register_ff` with its subparsers; the export runs
through its :func:`~fwdfleet.cli.export_cmd.run_export` like every kind's. torch is not needed
to export an FF MLP (only to build its torch twin).
"""

from __future__ import annotations

import argparse
from typing import Any

from fwdfleet.cli.export_cmd import run_export
from fwdfleet.errors import ExportError

_HEADS = ("none", "softmax", "class-goodness")
_SCORE_LAYERS = ("all_but_first", "all")


def register_ff(export_subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = export_subparsers.add_parser(
        "ff-mlp",
        help="export a Forward-Forward MLP (label in the input, one graph per layer)",
        description=(
            "Export a Forward-Forward MLP as a bundle: graph 'model' (logits = label goodness summed "
            "over layers, or the layers' head logits; per-sample cross-entropy loss) and graphs "
            "'layer_0'..'layer_{L-1}' (RMS-normalised input -> relu layer -> h, goodness, head_logits). "
            "Every weight is a named graph input. Layer-local training happens on the device "
            "(device_runtime.ff_train)."
        ),
    )
    p.add_argument("--layers", default="784,2000,2000,2000,2000",
                   help="input width then each layer's width, comma-separated (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="number of labels (default: %(default)s)")
    p.add_argument("--heads", choices=_HEADS, default="none",
                   help="per-layer head: softmax (PON) or class-goodness (SFF) (default: %(default)s)")
    p.add_argument("--head-units-per-class", type=int, default=4,
                   help="units per class of a class-goodness head (default: %(default)s)")
    p.add_argument("--score-layers", choices=_SCORE_LAYERS, default="all_but_first",
                   help="layers summed into graph 'model''s logits (default: %(default)s, as in Hinton's paper)")
    p.add_argument("--label-scale", type=float, default=1.0,
                   help="value of the one-hot label written into the first num-classes inputs (default: %(default)s)")
    p.add_argument("--batch", default="dynamic", help="fixed batch size N, or 'dynamic' (default: %(default)s)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 13..23 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: %(default)s)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="not supported for FF MLPs: every weight is trainable (kept for a clear error)")
    p.add_argument("--out", "-o", required=True, help="output bundle folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_export, kind="ff_mlp", make_config=_config)
    register_ff_cnn(export_subparsers)
    return p


def register_ff_cnn(export_subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = export_subparsers.add_parser(
        "ff-cnn",
        help="export a block-wise CNN trained by Scalable Forward-Forward (block, gradient and model graphs)",
        description=(
            "Export a CNN cut into blocks, each with a 1x1-conv head (one channel per class; class goodness = "
            "spatial mean of the squared head output) and the SFF log-sum-exp loss. Graphs: 'block_i' (block + "
            "head + per-sample loss + updated batch-norm statistics), 'grad_i' (the block-local gradient of "
            "the loss w.r.t. the block's trainables, inference operators only) and 'model' (prediction by the "
            "sum of the heads and by the last head). Every graph is checked against torch. Needs torch."
        ),
    )
    p.add_argument("--blocks", default="conv:1:16:pool,conv:16:32:pool,residual:32:32",
                   help="comma-separated kind:in_channels:out_channels[:pool] with kind conv or residual "
                        "(default: %(default)s)")
    p.add_argument("--in-channels", type=int, default=1, help="image channels (default: %(default)s)")
    p.add_argument("--image-size", default="28x28", help="HxW of the images (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="number of classes (default: %(default)s)")
    p.add_argument("--bn-momentum", type=float, default=0.1, help="batch-norm momentum (default: %(default)s)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..23 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: %(default)s)")
    p.add_argument("--out", "-o", required=True, help="output bundle folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_export, kind="ff_cnn", make_config=_cnn_config)
    return p


def _cnn_config(args: argparse.Namespace) -> Any:
    from fwdfleet.export.ff_cnn import FFCNNConfig, parse_blocks

    try:
        h, w = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError as e:
        raise ExportError(f"--image-size must be HxW like 28x28, got {args.image_size!r}") from e
    return FFCNNConfig(blocks=parse_blocks(args.blocks), in_channels=args.in_channels, image_size=(h, w),
                       num_classes=args.num_classes, bn_momentum=args.bn_momentum, opset=args.opset, seed=args.seed)


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError as e:
        raise ExportError(f"--layers must be comma-separated integers like 784,2000,2000, got {text!r}") from e
    return layers


def _parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        return int(text)
    except ValueError as e:
        raise ExportError(f"--batch must be a positive integer or 'dynamic', got {text!r}") from e


def _config(args: argparse.Namespace) -> Any:
    from fwdfleet.export.ff_mlp import FFMLPConfig

    return FFMLPConfig(
        layers=_parse_layers(args.layers),
        num_classes=args.num_classes,
        heads=args.heads,
        head_units_per_class=args.head_units_per_class,
        label_scale=args.label_scale,
        score_layers=args.score_layers,
        batch=_parse_batch(args.batch),
        opset=args.opset,
        seed=args.seed,
        quantization=None if args.quantize == "none" else args.quantize,
    )
