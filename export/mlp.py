"""The ``mlp`` kind in torch: the ``torch`` graph builder and the torch twin.

The kind itself (config, graph contract, parity reference, manifest) is
:mod:`fwdfleet.export.onnx_mlp`, whose default builder needs no torch.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.bundle import Bundle
from fwdfleet.errors import ExportError
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

__all__ = ["MLPConfig", "export_mlp", "torch_twin", "trace_mlp"]  # MLPConfig/export_mlp live in onnx_mlp


def trace_mlp(config: MLPConfig, values: Mapping[str, np.ndarray], out_file: Path) -> None:
    """Write graph ``model`` of ``config`` to ``out_file`` by tracing it with torch (builder ``torch``).

    The TorchScript exporter: sub-second for a model this size, and one self-contained file.
    """
    try:
        import torch
    except ImportError as e:
        raise ExportError("MLPConfig(builder='torch') needs torch: pip install torch==2.13.0 "
                          "(or use the default builder 'onnx')") from e
    n_layers = len(config.layer_sizes) - 1

    class _MLP(torch.nn.Module):
        def forward(self, x: torch.Tensor, labels: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = _mlp_logits(x, params, n_layers)
            return logits, torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    specs = config.trainables
    example = (
        torch.zeros(2, config.layer_sizes[0]),
        torch.zeros(2, dtype=torch.int64),
        *(torch.from_numpy(values[t.name]) for t in specs),
    )
    dynamic = {"x": {0: "batch"}, "labels": {0: "batch"}, "logits": {0: "batch"}, "loss": {0: "batch"}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is not actionable here
        torch.onnx.export(
            _MLP(), example, str(Path(tmp) / "model.onnx"),
            input_names=["x", "labels", *(t.name for t in specs)], output_names=["logits", "loss"],
            dynamic_axes=dynamic, opset_version=config.opset, dynamo=False,
        )
        (Path(tmp) / "model.onnx").replace(out_file)


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
