"""Export a Forward-Forward MLP as a bundle of kind ``ff_mlp`` (graphs built with ``onnx.helper``).

The network
-----------
``layers = (d_0, d_1, ..., d_L)`` describes ``L`` fully connected layers. Layer ``i`` maps
``x`` (batch, d_i) to ``h`` (batch, d_{i+1}):

* ``xn = x / sqrt(mean(x**2, axis=1) + norm_eps)``: RMS normalisation, so every layer's input
  has length ``sqrt(d_i)`` (plain unit length leaves FF at chance);
* ``h = relu(xn @ W.T + b)`` with ``W = layers.i.weight`` (d_{i+1}, d_i), ``b = layers.i.bias``;
* ``goodness = mean(h**2, axis=1)`` (batch,): Hinton's sum of squares divided by the width,
  so that thresholds near 1 suit every width;
* optional per-layer head (``heads.i.weight``, ``heads.i.bias``) on ``h``:
  ``softmax`` (PON, PFF paper): ``head_logits = h @ Wh.T + bh`` (batch, C), Wh (C, d_{i+1});
  ``class-goodness`` (SFF): ``z = h @ Wh.T + bh`` with Wh (C * m, d_{i+1}),
  ``head_logits[:, c] = mean(z[:, c*m:(c+1)*m]**2)`` (batch, C): the goodness of a
  class-specific group of m units (``head_units_per_class``), trained by log-sum-exp.

Labels enter the input as in Hinton's paper: the first ``C = num_classes`` input features are
overwritten with ``label_scale * one_hot(label)``. A *neutral* input (used when a head predicts)
has every one of those ``C`` features set to ``label_scale / C``.

Graph contract
--------------
``model`` (``model.onnx``): inputs ``x`` float32 (batch, d_0) raw (no label embedded),
``labels`` int64 (batch,), and every trainable tensor as a named input. Outputs ``logits``
float32 (batch, C) and ``loss`` float32 (batch,) = cross-entropy of ``logits`` against
``labels`` (so the whole net can also be trained by perturbed inference, BAFFLE-style).
Without heads, ``logits[:, c]`` is the goodness of the input with label ``c`` embedded, summed
over the scored layers; with heads, it is the sum of the scored layers' ``head_logits`` on the
neutral input. The scored layers are all but the first (Hinton) when ``score_layers ==
"all_but_first"`` and the net has more than one layer, else all layers.

``layer_i`` (``layer_i.onnx``, i = 0 .. L-1): input ``x`` float32 (batch, d_i) (layer 0: the input
with the label, or the neutral label, already embedded; layer i: the previous layer's ``h``),
the layer's ``layers.i.weight``/``layers.i.bias`` (and ``heads.i.weight``/``heads.i.bias``)
as named inputs. The RMS normalisation happens inside the graph. Outputs ``h`` (batch,
d_{i+1}), ``goodness`` (batch,), and ``head_logits`` (batch, C) when heads are exported.

Every weight is trainable and fed as a graph input (there are no frozen weights), so int8
quantization of frozen weights does not apply and is rejected. The manifest's ``settings``
record everything needed to rebuild the network (:func:`torch_twin`) or to train it on a device
(``device_runtime.ff``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fwdfleet.bundle import Bundle, GraphSpec, TensorSpec
from fwdfleet.errors import ExportError
from fwdfleet.export.kinds import Built, ExportKind, ManifestExtras, Sample, perturbed

Head = Literal["none", "softmax", "class-goodness"]
HEADS: tuple[Head, ...] = ("none", "softmax", "class-goodness")
ScoreLayers = Literal["all_but_first", "all"]
SCORE_LAYERS: tuple[ScoreLayers, ...] = ("all_but_first", "all")
MIN_OPSET, MAX_OPSET = 13, 23
IR_VERSION = 8


@dataclass(frozen=True)
class FFMLPConfig:
    """What to export. ``layers[0]`` is the input width; each further entry adds a layer."""

    layers: tuple[int, ...] = (784, 2000, 2000, 2000, 2000)
    num_classes: int = 10
    heads: Head = "none"
    head_units_per_class: int = 4
    label_scale: float = 1.0
    score_layers: ScoreLayers = "all_but_first"
    norm_eps: float = 1e-6
    batch: int | None = None  # None: dynamic batch axis
    opset: int = 18
    seed: int = 0
    quantization: str | None = None

    def __post_init__(self) -> None:
        if len(self.layers) < 2 or any(int(d) < 1 for d in self.layers):
            raise ValueError(f"FFMLPConfig.layers needs an input width and >= 1 layer width, got {self.layers}")
        if self.num_classes < 2:
            raise ValueError(f"FFMLPConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.layers[0] <= self.num_classes:
            raise ValueError(
                f"FFMLPConfig.layers[0] ({self.layers[0]}) must exceed num_classes ({self.num_classes}): "
                "the label is embedded in the first num_classes input features"
            )
        if self.heads not in HEADS:
            raise ValueError(f"FFMLPConfig.heads must be one of {HEADS}, got {self.heads!r}")
        if self.head_units_per_class < 1:
            raise ValueError("FFMLPConfig.head_units_per_class must be >= 1")
        if not (math.isfinite(self.label_scale) and self.label_scale > 0):
            raise ValueError("FFMLPConfig.label_scale must be a positive finite number")
        if self.score_layers not in SCORE_LAYERS:
            raise ValueError(f"FFMLPConfig.score_layers must be one of {SCORE_LAYERS}")
        if not (self.norm_eps > 0):
            raise ValueError("FFMLPConfig.norm_eps must be positive")
        if self.batch is not None and self.batch < 1:
            raise ValueError("FFMLPConfig.batch must be a positive integer or None (dynamic)")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"FFMLPConfig.opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset}")
        if self.quantization is not None:
            raise ValueError(
                f"FFMLPConfig.quantization={self.quantization!r}: a Forward-Forward MLP has no frozen weights "
                "(every weight is trainable and fed as a graph input), so int8 quantization does not apply; "
                "export without quantization"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers) - 1

    def head_width(self) -> int:
        return self.num_classes * (self.head_units_per_class if self.heads == "class-goodness" else 1)

    def scored_layers(self) -> tuple[int, ...]:
        if self.score_layers == "all_but_first" and self.num_layers > 1:
            return tuple(range(1, self.num_layers))
        return tuple(range(self.num_layers))

    def settings(self) -> dict[str, Any]:
        """The manifest's kind-specific settings (read back by ``device_runtime.ff``)."""
        return {
            "layers": list(self.layers),
            "num_classes": self.num_classes,
            "heads": self.heads,
            "head_units_per_class": self.head_units_per_class,
            "label_scale": self.label_scale,
            "score_layers": self.score_layers,
            "norm_eps": self.norm_eps,
            "goodness": "mean_square",
            "seed": self.seed,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> FFMLPConfig:
        return cls(
            layers=tuple(int(d) for d in settings["layers"]),
            num_classes=int(settings["num_classes"]),
            heads=settings.get("heads", "none"),
            head_units_per_class=int(settings.get("head_units_per_class", 4)),
            label_scale=float(settings.get("label_scale", 1.0)),
            score_layers=settings.get("score_layers", "all_but_first"),
            norm_eps=float(settings.get("norm_eps", 1e-6)),
            seed=int(settings.get("seed", 0)),
        )


def trainable_specs(config: FFMLPConfig) -> tuple[TensorSpec, ...]:
    """Canonical order: per layer, weight, bias, then its head's weight and bias."""
    specs: list[TensorSpec] = []
    for i in range(config.num_layers):
        d_in, d_out = config.layers[i], config.layers[i + 1]
        specs += [TensorSpec(f"layers.{i}.weight", (d_out, d_in)), TensorSpec(f"layers.{i}.bias", (d_out,))]
        if config.heads != "none":
            hw = config.head_width()
            specs += [TensorSpec(f"heads.{i}.weight", (hw, d_out)), TensorSpec(f"heads.{i}.bias", (hw,))]
    return tuple(specs)


def initial_trainables(config: FFMLPConfig) -> dict[str, np.ndarray]:
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    values: dict[str, np.ndarray] = {}
    for spec in trainable_specs(config):
        shape = tuple(int(d) for d in spec.shape)
        fan_in = shape[1] if spec.name.endswith(".weight") else values[spec.name[: -len("bias")] + "weight"].shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        values[spec.name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return values


class _GraphBuilder:
    """Collects nodes and constants with unique names for one ONNX graph."""

    def __init__(self, config: FFMLPConfig) -> None:
        from onnx import TensorProto, helper

        self.helper, self.TensorProto = helper, TensorProto
        self.config = config
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, values: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(values, dtype=dtype)
        n = self.name(stem)
        self.initializers.append(self.helper.make_tensor(
            n, self.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape), arr.reshape(-1).tolist()
        ))
        return n

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs: Any) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def reduce_mean(self, x: str, axis: int, keepdims: int) -> str:
        if self.config.opset >= 18:
            return self.op("ReduceMean", [x, self.const("axes", [axis], np.int64)], keepdims=keepdims)
        return self.op("ReduceMean", [x], axes=[axis], keepdims=keepdims)

    def layer(self, i: int, x: str) -> tuple[str, str, str | None]:
        """Nodes of layer ``i`` on ``x``; returns the names of (h, goodness, head_logits)."""
        c = self.config
        ms = self.reduce_mean(self.op("Mul", [x, x]), axis=1, keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [ms, self.const("eps", c.norm_eps)])])
        xn = self.op("Div", [x, rms], f"l{i}_xn")
        a = self.op("Gemm", [xn, f"layers.{i}.weight", f"layers.{i}.bias"], f"l{i}_a", transB=1)
        h = self.op("Relu", [a], f"l{i}_h")
        goodness = self.reduce_mean(self.op("Mul", [h, h]), axis=1, keepdims=0)
        if c.heads == "none":
            return h, goodness, None
        z = self.op("Gemm", [h, f"heads.{i}.weight", f"heads.{i}.bias"], f"l{i}_head", transB=1)
        if c.heads == "softmax":
            return h, goodness, z
        groups = self.op("Reshape", [z, self.const("shape", [-1, c.num_classes, c.head_units_per_class], np.int64)])
        return h, goodness, self.reduce_mean(self.op("Mul", [groups, groups]), axis=2, keepdims=0)

    def model(self, name: str, inputs: list[Any], outputs: list[Any]) -> Any:
        import onnx

        graph = self.helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", self.config.opset)])
        model.ir_version = IR_VERSION
        model.producer_name = "fwdfleet.export.ff_mlp"
        onnx.checker.check_model(model, full_check=True)
        return model


def _batch_dim(config: FFMLPConfig) -> int | str:
    return config.batch if config.batch is not None else "batch"


def _value_info(builder: _GraphBuilder, spec: TensorSpec) -> Any:
    elem = builder.TensorProto.INT64 if spec.dtype == "int64" else builder.TensorProto.FLOAT
    return builder.helper.make_tensor_value_info(spec.name, elem, list(spec.shape))


def _layer_graph(config: FFMLPConfig, i: int) -> tuple[Any, GraphSpec]:
    b = _GraphBuilder(config)
    h, goodness, head = b.layer(i, "x")
    batch = _batch_dim(config)
    names = [f"layers.{i}.weight", f"layers.{i}.bias"]
    if config.heads != "none":
        names += [f"heads.{i}.weight", f"heads.{i}.bias"]
    specs = {t.name: t for t in trainable_specs(config)}
    inputs = (TensorSpec("x", (batch, config.layers[i])), *(specs[n] for n in names))
    outputs = [TensorSpec("h", (batch, config.layers[i + 1])), TensorSpec("goodness", (batch,))]
    b.nodes.append(b.helper.make_node("Identity", [h], ["h"]))
    b.nodes.append(b.helper.make_node("Identity", [goodness], ["goodness"]))
    if head is not None:
        outputs.append(TensorSpec("head_logits", (batch, config.num_classes)))
        b.nodes.append(b.helper.make_node("Identity", [head], ["head_logits"]))
    model = b.model(f"layer_{i}", [_value_info(b, t) for t in inputs], [_value_info(b, t) for t in outputs])
    return model, GraphSpec(f"layer_{i}", f"layer_{i}.onnx", inputs, tuple(outputs), tuple(names))


def _model_graph(config: FFMLPConfig) -> tuple[Any, GraphSpec]:
    b = _GraphBuilder(config)
    c, batch = config, _batch_dim(config)
    d0, nc = c.layers[0], c.num_classes
    rest = b.op("Slice", ["x", b.const("start", [nc], np.int64), b.const("end", [d0], np.int64),
                          b.const("axis", [1], np.int64)], "x_rest")
    x_batch = b.op("Slice", [b.op("Shape", ["x"]), b.const("zero", [0], np.int64), b.const("one", [1], np.int64)])
    if c.heads == "none":
        # (batch, C, d0): row (n, c) is sample n with label c embedded; flattened to (batch * C, d0).
        onehots = b.op("Expand", [b.const("eye", np.eye(nc)[None] * c.label_scale), b.op("Concat", [
            x_batch, b.const("dims", [nc, nc], np.int64)], axis=0)])
        rest3 = b.op("Expand", [b.op("Unsqueeze", [rest, b.const("axes", [1], np.int64)]), b.op("Concat", [
            x_batch, b.const("dims", [nc, d0 - nc], np.int64)], axis=0)])
        x_in = b.op("Reshape", [b.op("Concat", [onehots, rest3], axis=2), b.const("shape", [-1, d0], np.int64)])
    else:
        neutral = b.op("Expand", [b.const("neutral", np.full((1, nc), c.label_scale / nc)), b.op("Concat", [
            x_batch, b.const("dims", [nc], np.int64)], axis=0)])
        x_in = b.op("Concat", [neutral, rest], axis=1)
    total: str | None = None
    h = x_in
    for i in range(c.num_layers):
        h, goodness, head = b.layer(i, h)
        if i in c.scored_layers():
            score = b.op("Reshape", [goodness, b.const("shape", [-1, nc], np.int64)]) if head is None else head
            total = score if total is None else b.op("Add", [total, score])
    assert total is not None
    b.nodes.append(b.helper.make_node("Identity", [total], ["logits"]))
    logp = b.op("LogSoftmax", ["logits"], axis=1)
    picked = b.op("GatherElements", [logp, b.op("Unsqueeze", ["labels", b.const("axes", [1], np.int64)])], axis=1)
    b.nodes.append(b.helper.make_node("Neg", [b.op("Squeeze", [picked, b.const("axes", [1], np.int64)])], ["loss"]))
    specs = trainable_specs(config)
    inputs = (TensorSpec("x", (batch, d0)), TensorSpec("labels", (batch,), "int64"), *specs)
    outputs = (TensorSpec("logits", (batch, nc)), TensorSpec("loss", (batch,)))
    model = b.model("model", [_value_info(b, t) for t in inputs], [_value_info(b, t) for t in outputs])
    return model, GraphSpec("model", "model.onnx", inputs, outputs, tuple(t.name for t in specs))


def ff_layer(config: FFMLPConfig, values: Mapping[str, np.ndarray], i: int,
             x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Layer ``i``'s (h, goodness, head_logits) on ``x`` in float64 numpy (graph ``layer_i``'s reference)."""
    c = config
    inp = np.asarray(x, np.float64)

    def w(name: str) -> np.ndarray:
        return np.asarray(values[name], np.float64)

    xn = inp / np.sqrt((inp * inp).mean(axis=1, keepdims=True) + c.norm_eps)
    h = np.maximum(xn @ w(f"layers.{i}.weight").T + w(f"layers.{i}.bias"), 0.0)
    goodness = (h * h).mean(axis=1)
    if c.heads == "none":
        return h, goodness, None
    z = h @ w(f"heads.{i}.weight").T + w(f"heads.{i}.bias")
    if c.heads == "softmax":
        return h, goodness, z
    z = z.reshape(-1, c.num_classes, c.head_units_per_class)
    return h, goodness, (z * z).mean(axis=2)


def ff_logits(config: FFMLPConfig, values: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Graph ``model``'s logits on raw ``x`` in float64 numpy (its reference; see the module doc)."""
    c = config
    x = np.asarray(x, np.float64)
    n, nc = x.shape[0], c.num_classes
    if c.heads == "none":  # row (n, c): sample n with label c embedded
        rows = np.repeat(x[:, None, :], nc, axis=1)
        rows[:, :, :nc] = np.eye(nc) * c.label_scale
        h = rows.reshape(n * nc, -1)
    else:
        h = x.copy()
        h[:, :nc] = c.label_scale / nc
    total = np.zeros((n, nc))
    for i in range(c.num_layers):
        h, goodness, head = ff_layer(c, values, i, h)
        if i in c.scored_layers():
            total = total + (goodness.reshape(n, nc) if head is None else head)
    return total


class FFMLPKind(ExportKind[FFMLPConfig]):
    name = "ff_mlp"
    config_type = FFMLPConfig

    def build(self, config: FFMLPConfig, work: Path) -> Built:
        import onnx

        graphs: list[GraphSpec] = []
        for model, spec in [_model_graph(config), *(_layer_graph(config, i) for i in range(config.num_layers))]:
            onnx.save(model, str(work / spec.file))
            graphs.append(spec)
        return Built(tuple(graphs), initial_trainables(config), config.opset)

    def samples(self, config: FFMLPConfig, built: Built) -> Sequence[Sample]:
        """Graph ``model`` on raw inputs, and each layer graph on inputs of its width."""
        rng = np.random.default_rng(config.seed + 1)
        n = config.batch or 3
        values = perturbed(built.initial, 0.05, config.seed + 2)
        out = [Sample("model", {"x": rng.standard_normal((n, config.layers[0])).astype(np.float32),
                                "labels": rng.integers(0, config.num_classes, n).astype(np.int64), **values})]
        for g in built.graphs[1:]:
            i = int(g.name.removeprefix("layer_"))
            x = rng.standard_normal((n, config.layers[i])).astype(np.float32)
            out.append(Sample(g.name, {"x": x, **{k: values[k] for k in g.trainables}}))
        return out

    def reference(self, config: FFMLPConfig, built: Built, sample: Sample) -> Sequence[np.ndarray]:
        f = sample.feeds
        if sample.graph == "model":
            logits = ff_logits(config, f, f["x"])
            m = logits.max(axis=1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
            return [logits, -logp[np.arange(len(logits)), f["labels"]]]
        h, goodness, head = ff_layer(config, f, int(sample.graph.removeprefix("layer_")), f["x"])
        return [h, goodness] if head is None else [h, goodness, head]

    def manifest_extras(self, config: FFMLPConfig, built: Built) -> ManifestExtras:
        return ManifestExtras(labels=tuple(str(c) for c in range(config.num_classes)), settings=config.settings())

    def torch_twin(self, bundle: Bundle) -> Any:
        return torch_twin(bundle)


KIND = FFMLPKind()


def export_ff_mlp(config: FFMLPConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the bundle (``model.onnx``, ``layer_i.onnx``, trainables, manifest) into ``out_dir``.

    ``overwrite`` replaces an existing *bundle* folder; any other non-empty folder is refused.
    """
    try:
        import onnx  # noqa: F401
    except ModuleNotFoundError as e:
        raise ExportError("writing an ff_mlp bundle needs the `onnx` package, a dependency of fwdfleet: "
                          "pip install 'onnx>=1.16' (or reinstall fwdfleet)") from e
    return KIND.export(config, out_dir, overwrite=overwrite).bundle.path


def torch_twin(bundle: Bundle) -> Any:
    """A ``torch.nn.Module`` computing what the bundle's graphs compute, with its trainables as parameters.

    ``forward(x=..., labels=...)`` returns the per-sample loss (batch,) of graph ``model``;
    ``scores(x)`` its logits; ``layer(i, x)`` layer ``i``'s (h, goodness, head_logits).
    """
    import torch
    from torch import nn

    if bundle.manifest.kind != "ff_mlp":
        raise ExportError(f"torch_twin needs an ff_mlp bundle, got kind {bundle.manifest.kind!r}")
    cfg = FFMLPConfig.from_settings(dict(bundle.manifest.settings))

    class FFMLPTwin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = cfg
            self.layers = nn.ModuleList(nn.Linear(cfg.layers[i], cfg.layers[i + 1]) for i in range(cfg.num_layers))
            if cfg.heads != "none":
                self.heads = nn.ModuleList(
                    nn.Linear(cfg.layers[i + 1], cfg.head_width()) for i in range(cfg.num_layers)
                )

        def layer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            xn = x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + cfg.norm_eps)
            h = torch.relu(self.layers[i](xn))
            goodness = (h * h).mean(dim=1)
            if cfg.heads == "none":
                return h, goodness, None
            z = self.heads[i](h)
            if cfg.heads == "softmax":
                return h, goodness, z
            z = z.reshape(-1, cfg.num_classes, cfg.head_units_per_class)
            return h, goodness, (z * z).mean(dim=2)

        def scores(self, x: torch.Tensor) -> torch.Tensor:
            n, nc = x.shape[0], cfg.num_classes
            if cfg.heads == "none":
                rows = x[:, None, :].expand(n, nc, x.shape[1]).clone()
                rows[:, :, :nc] = torch.eye(nc, dtype=x.dtype) * cfg.label_scale
                h = rows.reshape(n * nc, -1)
            else:
                h = x.clone()
                h[:, :nc] = cfg.label_scale / nc
            total = torch.zeros(n, nc, dtype=x.dtype)
            for i in range(cfg.num_layers):
                h, goodness, head = self.layer(i, h)
                if i in cfg.scored_layers():
                    total = total + (goodness.reshape(n, nc) if head is None else head)
            return total

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(self.scores(x), labels, reduction="none")

    twin = FFMLPTwin()
    values = bundle.load_trainables()
    with torch.no_grad():
        for name, param in twin.named_parameters():
            param.copy_(torch.from_numpy(values[name]))
    return twin
