"""Kind ``mlp``: a plain MLP classifier, the small model BAFFLE trains from scratch by scalars.

Graph ``model``: inputs ``x`` float32 (batch, in_dim) and ``labels`` int64 (batch,), and every
layer's ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,) as named inputs (nothing is
frozen); outputs ``logits`` (batch, num_classes) and per-sample cross-entropy ``loss``
(batch,). Hidden layers use tanh (smooth, so finite differences behave).

The graph is built here with ``onnx.helper``: this module imports numpy and onnx, never torch,
so ``fwdfleet demo`` and tests write MLP bundles in the base install. ``MLPConfig(builder=
"torch")`` traces the same network with torch instead (:mod:`fwdfleet.export.mlp`); both
write the same manifest and agree numerically (tested). The parity reference of both is
:func:`mlp_forward`, in float64 numpy.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fwdfleet.bundle import Bundle, GraphSpec, TensorSpec
from fwdfleet.errors import ExportError
from fwdfleet.export.kinds import Built, ExportKind, ManifestExtras, Sample, perturbed

Builder = Literal["onnx", "torch"]
BUILDERS: tuple[Builder, ...] = ("onnx", "torch")
IR_VERSION = 8


@dataclass(frozen=True)
class MLPConfig:
    """Layer sizes from input to classes, e.g. ``(64, 32, 10)``; ``builder`` writes the graph."""

    layer_sizes: tuple[int, ...] = (64, 32, 10)
    labels: tuple[str, ...] = ()
    seed: int = 0
    opset: int = 18
    builder: Builder = "onnx"

    def __post_init__(self) -> None:
        if len(self.layer_sizes) < 2 or any(s < 1 for s in self.layer_sizes):
            raise ValueError(f"MLPConfig.layer_sizes needs >= 2 positive sizes, got {self.layer_sizes}")
        if self.labels and len(self.labels) != self.layer_sizes[-1]:
            raise ValueError(f"MLPConfig.labels has {len(self.labels)} names for {self.layer_sizes[-1]} classes")
        if not 13 <= self.opset <= 23:
            raise ValueError(f"MLPConfig.opset must be between 13 and 23, got {self.opset}")
        if self.builder not in BUILDERS:
            raise ValueError(f"MLPConfig.builder must be one of {BUILDERS}, got {self.builder!r}")

    @property
    def trainables(self) -> tuple[TensorSpec, ...]:
        specs: list[TensorSpec] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(self.layer_sizes)):
            specs += [TensorSpec(f"layers.{i}.weight", (d_out, d_in)), TensorSpec(f"layers.{i}.bias", (d_out,))]
        return tuple(specs)

    def graph_spec(self) -> GraphSpec:
        n_classes = self.layer_sizes[-1]
        return GraphSpec(
            name="model", file="model.onnx",
            inputs=(TensorSpec("x", ("batch", self.layer_sizes[0])), TensorSpec("labels", ("batch",), "int64"),
                    *self.trainables),
            outputs=(TensorSpec("logits", ("batch", n_classes)), TensorSpec("loss", ("batch",))),
            trainables=tuple(t.name for t in self.trainables),
        )


def init_mlp(config: MLPConfig) -> dict[str, np.ndarray]:
    """Glorot-uniform weights, zero biases, from ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    values: dict[str, np.ndarray] = {}
    for t in config.trainables:
        if t.name.endswith("weight"):
            d_out, d_in = (int(d) for d in t.shape)
            limit = np.sqrt(6.0 / (d_in + d_out))
            values[t.name] = rng.uniform(-limit, limit, size=(d_out, d_in)).astype(np.float32)
        else:
            values[t.name] = np.zeros(t.size, dtype=np.float32)
    return values


def mlp_model(config: MLPConfig) -> Any:
    """The ``onnx.ModelProto`` of graph ``model`` (checked by ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper

    n_layers = len(config.layer_sizes) - 1
    nodes = []
    h = "x"
    for i in range(n_layers):
        out = "logits" if i == n_layers - 1 else f"layers.{i}.pre"
        nodes.append(helper.make_node("Gemm", [h, f"layers.{i}.weight", f"layers.{i}.bias"], [out], transB=1))
        if i < n_layers - 1:
            h = f"layers.{i}.out"
            nodes.append(helper.make_node("Tanh", [out], [h]))
    nodes += [
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("Unsqueeze", ["labels", "axis1"], ["labels2d"]),
        helper.make_node("GatherElements", ["logp", "labels2d"], ["picked"], axis=1),
        helper.make_node("Squeeze", ["picked", "axis1"], ["picked1d"]),
        helper.make_node("Neg", ["picked1d"], ["loss"]),
    ]
    spec = config.graph_spec()

    def info(t: TensorSpec) -> Any:
        elem = TensorProto.INT64 if t.dtype == "int64" else TensorProto.FLOAT
        return helper.make_tensor_value_info(t.name, elem, list(t.shape))

    graph = helper.make_graph(nodes, "mlp", [info(t) for t in spec.inputs], [info(t) for t in spec.outputs],
                              initializer=[helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", config.opset)])
    model.ir_version = IR_VERSION
    model.producer_name = "fwdfleet.export.onnx_mlp"
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_forward(values: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, per-sample loss) of the MLP in float64 numpy: the parity reference of the ``mlp`` kind."""
    n_layers = sum(1 for k in values if k.endswith(".weight"))
    h = np.asarray(x, dtype=np.float64)
    for i in range(n_layers):
        h = h @ np.asarray(values[f"layers.{i}.weight"], np.float64).T + np.asarray(values[f"layers.{i}.bias"])
        if i < n_layers - 1:
            h = np.tanh(h)
    m = h.max(axis=1, keepdims=True)
    logp = h - m - np.log(np.exp(h - m).sum(axis=1, keepdims=True))
    return h, -logp[np.arange(len(labels)), np.asarray(labels)]


class MLPKind(ExportKind[MLPConfig]):
    name = "mlp"
    config_type = MLPConfig

    def build(self, config: MLPConfig, work: Path) -> Built:
        values = init_mlp(config)
        if config.builder == "torch":
            from fwdfleet.export.mlp import trace_mlp

            trace_mlp(config, values, work / "model.onnx")
        else:
            import onnx

            onnx.save_model(mlp_model(config), str(work / "model.onnx"))
        return Built((config.graph_spec(),), values, config.opset)

    def samples(self, config: MLPConfig, built: Built) -> Sequence[Sample]:
        rng = np.random.default_rng(config.seed + 1)
        x = rng.standard_normal((5, config.layer_sizes[0])).astype(np.float32)
        labels = rng.integers(0, config.layer_sizes[-1], size=5).astype(np.int64)
        return [Sample("model", {"x": x, "labels": labels, **perturbed(built.initial, 0.1, config.seed + 2)})]

    def reference(self, config: MLPConfig, built: Built, sample: Sample) -> Sequence[np.ndarray]:
        f = sample.feeds
        return mlp_forward({k: v for k, v in f.items() if k.startswith("layers.")}, f["x"], f["labels"])

    def manifest_extras(self, config: MLPConfig, built: Built) -> ManifestExtras:
        n_classes = config.layer_sizes[-1]
        return ManifestExtras(
            labels=config.labels or tuple(str(i) for i in range(n_classes)),
            settings={"layer_sizes": list(config.layer_sizes), "activation": "tanh", "seed": config.seed},
        )

    def torch_twin(self, bundle: Bundle) -> Any:
        from fwdfleet.export.mlp import torch_twin

        return torch_twin(bundle)


KIND = MLPKind()


def export_mlp(config: MLPConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write an MLP classifier bundle to ``out_dir`` (new or empty; an old bundle with ``overwrite``)."""
    try:
        import onnx  # noqa: F401
    except ModuleNotFoundError as e:
        raise ExportError("writing an MLP bundle needs the `onnx` package, a dependency of fwdfleet: "
                          "pip install 'onnx>=1.16' (or reinstall fwdfleet)") from e
    return KIND.export(config, out_dir, overwrite=overwrite).bundle.path
