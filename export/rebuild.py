"""A torch twin of a bundle, for memory and speed comparisons against backprop.

:func:`torch_twin_from_bundle` rebuilds, from ``manifest.settings``, the torch model the bundle
was exported from, loads the bundle's trainable values into it and returns a module whose
``forward`` takes the graph's data inputs as keyword tensors and returns the per-sample loss
``(batch,)``. Its trainable parameters (``requires_grad=True``) are exactly the bundle's
trainables, under the same names, so ``loss.mean().backward()`` is the backprop baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fwdfleet.bundle import Bundle
from fwdfleet.errors import BundleError


class LossTwin(nn.Module):
    """Wraps a model whose forward returns (logits, loss, ...) and returns only the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.model(**inputs)[1]
        return loss


def _seq_cls(bundle: Bundle) -> nn.Module:
    from fwdfleet.export.seq_cls import build_model

    model, _ = build_model(bundle.manifest.settings)
    return LossTwin(model)


def _causal_lm(bundle: Bundle) -> nn.Module:
    from fwdfleet.export.causal_lm import build_model

    model, _ = build_model(bundle.manifest.settings)
    return LossTwin(model)


def _ff_mlp(bundle: Bundle) -> nn.Module:
    from fwdfleet.export.ff_mlp import torch_twin  # written by the Forward-Forward helper

    twin: nn.Module = torch_twin(bundle)
    return twin


def _mlp(bundle: Bundle) -> nn.Module:
    from fwdfleet.export.mlp import torch_twin

    twin: nn.Module = torch_twin(bundle)
    return twin


_BUILDERS: dict[str, Callable[[Bundle], nn.Module]] = {
    "mlp": _mlp,
    "seq_cls_lora": _seq_cls,
    "causal_lm_lora": _causal_lm,
    "ff_mlp": _ff_mlp,
}


def torch_twin_from_bundle(bundle: Bundle) -> nn.Module:
    """The bundle's model in torch with the bundle's current trainable values (see module doc)."""
    kind = bundle.manifest.kind
    if kind not in _BUILDERS:
        raise BundleError(f"no torch twin for bundle kind {kind!r}; known: {sorted(_BUILDERS)}")
    twin = _BUILDERS[kind](bundle)
    if kind in ("ff_mlp", "mlp"):  # these twins load the bundle's values themselves
        return twin
    values = bundle.load_trainables()
    inner: nn.Module = twin.model  # type: ignore[assignment]
    params: dict[str, Any] = dict(inner.named_parameters())
    missing = sorted(set(values) - set(params))
    if missing:
        raise BundleError(f"the rebuilt model has no parameters {missing[:3]}; was the source folder changed?")
    trainable = {n for n, p in params.items() if p.requires_grad}
    if trainable != set(values):
        raise BundleError("the rebuilt model's trainable parameters differ from the bundle's; "
                          "was the source folder or the toolkit version changed?")
    with torch.no_grad():
        for name, value in values.items():
            if tuple(params[name].shape) != value.shape:
                raise BundleError(f"trainable {name!r} has shape {value.shape} in the bundle but "
                                  f"{tuple(params[name].shape)} in the rebuilt model")
            params[name].copy_(torch.from_numpy(value))
    twin.eval()
    return twin
