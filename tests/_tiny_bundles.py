"""Tiny real bundles built with ``onnx.helper`` (no torch), shared by the device-runtime tests.

``make_classifier_bundle`` writes a softmax-regression (``hidden=None``) or a two-layer tanh MLP
classifier with the package's own builder (:mod:`fwdfleet.export.onnx_mlp`, kind ``mlp``):
data inputs ``x`` float32 (batch, in_dim) and ``labels`` int64 (batch,), trainables
``layers.{i}.weight`` (out, in) and ``layers.{i}.bias``, outputs ``logits`` (batch,
num_classes) and the per-sample cross-entropy ``loss`` (batch,). ``numpy_loss`` is the kind's
own float64 numpy reference, for checking derivatives analytically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from fwdfleet.bundle import (
    Bundle,
    BundleManifest,
    GraphSpec,
    TensorSpec,
    TokenizerSpec,
    load_bundle,
    write_bundle,
)
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp, mlp_forward

OPSET = 17
W, B = "layers.0.weight", "layers.0.bias"  # the softmax regression's trainables (hidden=None)


def make_classifier_bundle(
    directory: str | Path, in_dim: int, num_classes: int, hidden: int | None = None, seed: int = 0
) -> Bundle:
    """Write a tiny classifier bundle into ``directory`` (new or empty) and return it loaded and verified."""
    sizes = (in_dim, num_classes) if hidden is None else (in_dim, hidden, num_classes)
    return load_bundle(export_mlp(MLPConfig(layer_sizes=sizes, seed=seed, opset=OPSET), directory))


def numpy_loss(trainables: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The bundle's per-sample loss in float64 numpy (for analytic checks)."""
    return mlp_forward(trainables, x, labels)[1]


def numpy_directional_derivative(
    trainables: Mapping[str, np.ndarray], direction: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray
) -> float:
    """Analytic d/dt mean_loss(w + t v) at t=0 for the softmax-regression bundle (``W``, ``B``)."""
    grad = numpy_gradient(trainables, x, labels)
    return float((grad[W] * direction[W]).sum() + (grad[B] * direction[B]).sum())


def numpy_gradient(trainables: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Analytic gradient of the mean loss of the softmax-regression bundle (``W`` (classes, in), ``B``)."""
    logits, _ = mlp_forward(trainables, x, labels)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0  # dL/dlogits per sample
    xx = np.asarray(x, dtype=np.float64)
    return {W: p.T @ xx / len(labels), B: p.mean(axis=0)}


def make_text_bundle(
    directory: str | Path, words: list[str], num_classes: int, dim: int = 8, max_length: int = 16, seed: int = 0,
    labels: tuple[str, ...] | None = None,
) -> Bundle:
    """A tiny ``seq_cls_lora``-shaped text classifier: frozen embedding table, masked mean pooling, and a
    trainable linear head (``W``, ``b``), with a word-level ``tokenizer.json`` (needs ``tokenizers``).

    Data inputs ``input_ids``/``attention_mask`` (batch, sequence) int64 and ``labels`` (batch,);
    outputs ``logits``, per-sample ``loss`` and pooled ``features``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w.lower(): i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))

    rng = np.random.default_rng(seed)
    table = rng.standard_normal((len(vocab), dim)).astype(np.float32)
    inits = [
        helper.make_tensor("E", TensorProto.FLOAT, list(table.shape), table.reshape(-1).tolist()),
        helper.make_tensor("axes1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axes1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["features"]),
        helper.make_node("MatMul", ["features", "W"], ["fw"]),
        helper.make_node("Add", ["fw", "b"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("Unsqueeze", ["labels", "axes1"], ["labels2d"]),
        helper.make_node("GatherElements", ["logp", "labels2d"], ["picked"], axis=1),
        helper.make_node("Squeeze", ["picked", "axes1"], ["picked1d"]),
        helper.make_node("Neg", ["picked1d"], ["loss"]),
    ]
    vi = helper.make_tensor_value_info
    inputs = [
        vi("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        vi("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        vi("labels", TensorProto.INT64, ["batch"]),
        vi("W", TensorProto.FLOAT, [dim, num_classes]),
        vi("b", TensorProto.FLOAT, [num_classes]),
    ]
    outputs = [
        vi("logits", TensorProto.FLOAT, ["batch", num_classes]),
        vi("loss", TensorProto.FLOAT, ["batch"]),
        vi("features", TensorProto.FLOAT, ["batch", dim]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny_text", inputs, outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    trainables = (TensorSpec("W", (dim, num_classes)), TensorSpec("b", (num_classes,)))
    graph = GraphSpec(
        name="model",
        file="model.onnx",
        inputs=(
            TensorSpec("input_ids", ("batch", "sequence"), "int64"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64"),
            TensorSpec("labels", ("batch",), "int64"),
            *trainables,
        ),
        outputs=(
            TensorSpec("logits", ("batch", num_classes)),
            TensorSpec("loss", ("batch",)),
            TensorSpec("features", ("batch", dim)),
        ),
        trainables=("W", "b"),
    )
    manifest = BundleManifest(
        kind="seq_cls_lora",
        trainables=trainables,
        graphs=(graph,),
        labels=labels or tuple(f"class{i}" for i in range(num_classes)),
        tokenizer=TokenizerSpec(files=("tokenizer.json",), max_length=max_length),
        opset=OPSET,
        settings={"tiny_text": {"dim": dim}, "pad_token_id": 0, "vocab_size": len(vocab)},
    )
    values = {
        "W": (rng.standard_normal((dim, num_classes)) * 0.1).astype(np.float32),
        "b": np.zeros(num_classes, np.float32),
    }
    write_bundle(directory, manifest, values)
    return load_bundle(directory)
