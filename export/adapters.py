"""Bottleneck adapters for BERT-family encoders (Houlsby et al. 2019, Pfeiffer et al. 2021).

``peft`` has no bottleneck adapter (its "adaption prompt" is LLaMA-Adapter, a different
method), so this module provides the small one we need. In each chosen encoder layer the
output projection of the feed-forward block (``BertOutput.dense``, before its dropout and the
residual + LayerNorm) is wrapped as::

    h = dense(x)
    h + up(act(down(h)))        down: hidden -> size, up: size -> hidden

``up`` starts at zero (weight and bias), so at initialisation the adapted encoder computes
exactly what the frozen one does; ``down`` is drawn from the seeded torch generator (the
``nn.Linear`` default) with a zero bias, so the first perturbations of ``up`` already move
the loss. The trainables are named ``<layers>.<i>.output.dense.adapter_down.weight`` (and
``.bias``, ``adapter_up.*``); the frozen dense weight becomes ``...output.dense.base.weight``.

Supported: the families whose layers end in a ``BertOutput``-style module (``dense`` then
``LayerNorm``): see :data:`ADAPTER_FAMILIES`. DistilBERT's feed-forward block is shaped
differently and is refused with an :class:`~fwdfleet.errors.ExportError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fwdfleet.errors import ExportError

# model_type -> where the encoder layers live; each layer's adapter site is ``output.dense``.
ADAPTER_FAMILIES: Mapping[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "electra": "encoder.layer",
}
ACTIVATIONS = ("relu", "gelu", "tanh")


@dataclass(frozen=True)
class AdapterSettings:
    """Bottleneck adapter configuration. ``layers=None`` puts an adapter in every encoder layer."""

    size: int = 16
    layers: tuple[int, ...] | None = None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ExportError(f"AdapterSettings.size must be >= 1, got {self.size}")
        if self.layers is not None:
            if not self.layers:
                raise ExportError("AdapterSettings.layers must name at least one layer (or be None for all)")
            if any(i < 0 for i in self.layers):
                raise ExportError(f"AdapterSettings.layers must be layer indices >= 0, got {list(self.layers)}")
            if len(set(self.layers)) != len(self.layers):
                raise ExportError(f"AdapterSettings.layers has duplicates: {list(self.layers)}")
        if self.activation not in ACTIVATIONS:
            raise ExportError(f"AdapterSettings.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def record(self) -> dict[str, Any]:
        """The JSON-able form saved in ``manifest.settings["peft"]["adapter"]``."""
        return {"size": self.size, "layers": None if self.layers is None else list(self.layers),
                "activation": self.activation}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AdapterSettings:
        layers = record.get("layers")
        return cls(size=int(record.get("size", 16)),
                   layers=None if layers is None else tuple(int(i) for i in layers),
                   activation=str(record.get("activation", "relu")))


class BottleneckAdapter(nn.Module):
    """``base(x) + up(act(down(base(x))))`` with ``up`` initialised to zero (see module doc)."""

    def __init__(self, base: nn.Linear, size: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ExportError(f"adapter activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.base = base
        self.adapter_down = nn.Linear(base.out_features, size)
        self.adapter_up = nn.Linear(size, base.out_features)
        self.activation = activation
        with torch.no_grad():
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.base(x)
        z = self.adapter_down(h)
        if self.activation == "relu":
            z = torch.relu(z)
        elif self.activation == "gelu":
            z = nn.functional.gelu(z)
        else:
            z = torch.tanh(z)
        out: torch.Tensor = h + self.adapter_up(z)
        return out


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else type(model).__name__


def _unsupported(what: str) -> ExportError:
    return ExportError(
        f"bottleneck adapters are not supported for {what}; they need encoder layers that end in a "
        f"BertOutput-style dense + LayerNorm ({', '.join(sorted(ADAPTER_FAMILIES))}): use --method lora "
        "or bitfit for this model"
    )


def adapter_sites(model: nn.Module, layers: Sequence[int] | None) -> list[tuple[int, nn.Module, nn.Linear]]:
    """``(layer index, the layer's output module, its dense)`` for each layer that gets an adapter."""
    model_type = _model_type(model)
    if model_type not in ADAPTER_FAMILIES:
        raise _unsupported(f"model type {model_type!r}")
    try:
        stack = model.get_submodule(ADAPTER_FAMILIES[model_type])
    except AttributeError as e:
        raise _unsupported(f"this {model_type!r} model (it has no {ADAPTER_FAMILIES[model_type]})") from e
    if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
        raise _unsupported(f"this {model_type!r} model (no encoder layers found)")
    chosen = range(len(stack)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(stack)]
    if bad:
        raise ExportError(f"AdapterSettings.layers {bad} out of range: the encoder has layers 0..{len(stack) - 1}")
    sites: list[tuple[int, nn.Module, nn.Linear]] = []
    for i in sorted(chosen):
        owner = getattr(stack[i], "output", None)
        dense = getattr(owner, "dense", None)
        if isinstance(dense, BottleneckAdapter):
            raise ExportError(f"layer {i} already has a bottleneck adapter; load a fresh model")
        if owner is None or not isinstance(dense, nn.Linear) or not hasattr(owner, "LayerNorm"):
            raise _unsupported(f"layer {i} of this {model_type!r} model ({type(stack[i]).__name__} has no "
                               "output.dense Linear followed by a LayerNorm)")
        sites.append((i, owner, dense))
    return sites


def inject_adapters(model: nn.Module, settings: AdapterSettings, seed: int) -> list[str]:
    """Wrap each chosen layer's ``output.dense`` in a :class:`BottleneckAdapter` (seeded).

    Returns the names of the new (trainable) parameters. Other parameters are left as they are.
    """
    sites = adapter_sites(model, settings.layers)
    torch.manual_seed(seed)
    for _, owner, dense in sites:
        owner.dense = BottleneckAdapter(dense, settings.size, settings.activation)
    return [n for n, _ in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n]
