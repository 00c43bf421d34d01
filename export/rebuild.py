"""A torch twin of a bundle, for memory and speed comparisons against backprop.

:func:`torch_twin_from_bundle` rebuilds, from ``manifest.settings``, the torch model the bundle
was exported from (each kind's ``torch_twin`` part, looked up in the export-kind registry),
with the bundle's trainable values, and returns a module whose ``forward`` takes the graph's
data inputs as keyword tensors and returns the per-sample loss ``(batch,)``. Its trainable
parameters (``requires_grad=True``) are exactly the bundle's trainables, under the same names,
so ``loss.mean().backward()`` is the backprop baseline.
"""

from __future__ import annotations

from torch import nn

from fwdfleet.bundle import Bundle
from fwdfleet.errors import BundleError, ExportError
from fwdfleet.export.kinds import REGISTRY, get_kind


def torch_twin_from_bundle(bundle: Bundle) -> nn.Module:
    """The bundle's model in torch with the bundle's current trainable values (see module doc)."""
    kind = bundle.manifest.kind
    if kind not in REGISTRY:
        raise BundleError(f"no torch twin for bundle kind {kind!r}; known: {sorted(REGISTRY)}")
    try:
        twin: nn.Module = get_kind(kind).torch_twin(bundle)
    except ExportError as e:
        raise BundleError(str(e)) from e
    return twin
