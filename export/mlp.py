"""A plain MLP classifier as a bundle: the small model BAFFLE trains from scratch by scalars.

Graph "model": inputs ``x`` float32 (batch, in_dim) and ``labels`` int64 (batch,), and every
layer's ``layers.{i}.weight`` / ``layers.{i}.bias`` as named inputs (nothing is frozen);
outputs ``logits`` (batch, num_classes) and per-sample cross-entropy ``loss`` (batch,).
Hidden layers use tanh (smooth, so finite differences behave).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.bundle import Bundle, BundleManifest, GraphSpec, TensorSpec, write_bundle
from fwdfleet.errors import ExportError


@dataclass(frozen=True)
class MLPConfig:
    """Layer sizes from input to classes, e.g. ``(64, 32, 10)``."""

    layer_sizes: tuple[int, ...] = (64, 32, 10)
    labels: tuple[str, ...] = ()
    seed: int = 0
    opset: int = 18

    def __post_init__(self) -> None:
        if len(self.layer_sizes) < 2 or any(s < 1 for s in self.layer_sizes):
            raise ValueError(f"MLPConfig.layer_sizes needs >= 2 positive sizes, got {self.layer_sizes}")
        if self.labels and len(self.labels) != self.layer_sizes[-1]:
            raise ValueError(f"MLPConfig.labels has {len(self.labels)} names for {self.layer_sizes[-1]} classes")

    @property
    def trainables(self) -> tuple[TensorSpec, ...]:
        specs: list[TensorSpec] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(self.layer_sizes)):
            specs += [TensorSpec(f"layers.{i}.weight", (d_out, d_in)), TensorSpec(f"layers.{i}.bias", (d_out,))]
        return tuple(specs)


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


def export_mlp(config: MLPConfig, out_dir: str | Path) -> Path:
    """Write an MLP classifier bundle to ``out_dir`` (created; must be empty if it exists)."""
    try:
        import torch
    except ImportError as e:
        raise ExportError("export needs torch: pip install torch==2.13.0 && pip install 'fwdfleet[export]'") from e
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose a new folder for the bundle")
    out.mkdir(parents=True, exist_ok=True)
    n_layers = len(config.layer_sizes) - 1

    class _MLP(torch.nn.Module):
        def forward(self, x: torch.Tensor, labels: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = _mlp_logits(x, params, n_layers)
            return logits, torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    values = init_mlp(config)
    specs = config.trainables
    names = ["x", "labels", *(t.name for t in specs)]
    example = (
        torch.zeros(2, config.layer_sizes[0]),
        torch.zeros(2, dtype=torch.int64),
        *(torch.from_numpy(values[t.name]) for t in specs),
    )
    dynamic = {"x": {0: "batch"}, "labels": {0: "batch"}, "logits": {0: "batch"}, "loss": {0: "batch"}}
    with tempfile.TemporaryDirectory() as tmp:
        # The TorchScript exporter: sub-second for a model this size, and one self-contained file.
        torch.onnx.export(
            _MLP(),
            example,
            str(Path(tmp) / "model.onnx"),
            input_names=names,
            output_names=["logits", "loss"],
            dynamic_axes=dynamic,
            opset_version=config.opset,
            dynamo=False,
        )
        (Path(tmp) / "model.onnx").replace(out / "model.onnx")
    n_classes = config.layer_sizes[-1]
    graph = GraphSpec(
        name="model",
        file="model.onnx",
        inputs=(
            TensorSpec("x", ("batch", config.layer_sizes[0])),
            TensorSpec("labels", ("batch",), "int64"),
            *specs,
        ),
        outputs=(TensorSpec("logits", ("batch", n_classes)), TensorSpec("loss", ("batch",))),
        trainables=tuple(t.name for t in specs),
    )
    manifest = BundleManifest(
        kind="mlp",
        trainables=specs,
        graphs=(graph,),
        labels=config.labels or tuple(str(i) for i in range(n_classes)),
        opset=config.opset,
        settings={"layer_sizes": list(config.layer_sizes), "activation": "tanh", "seed": config.seed},
    )
    write_bundle(out, manifest, values)
    return out


def _mlp_logits(x: Any, params: Sequence[Any], n_layers: int) -> Any:
    import torch

    h = x
    for i in range(n_layers):
        h = torch.nn.functional.linear(h, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def torch_twin(bundle: Bundle) -> Any:
    """The bundle's MLP in torch, with its current values as parameters; forward(x=, labels=) -> loss."""
    import torch

    sizes = tuple(int(v) for v in bundle.manifest.settings["layer_sizes"])
    values = bundle.load_trainables()

    class MLPClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in itertools.pairwise(sizes))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            params = [p for layer in self.layers for p in (layer.weight, layer.bias)]
            logits = _mlp_logits(x, params, len(self.layers))
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    twin = MLPClassifier()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(torch.from_numpy(values[name]))
    return twin.eval()
