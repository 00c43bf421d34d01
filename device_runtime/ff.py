"""Forward-Forward MLP bundles on the device: the network's layout, label embedding, running its
layers (numpy or the bundle's per-layer ONNX graphs) and predicting.

The layer math and objectives are in :mod:`device_runtime.ff_objectives`; layer-local training
(closed-form or by perturbed inference) in :mod:`device_runtime.ff_train`. The graph contract
is documented in ``export/ff_mlp.py``; :class:`FFLayout` reads it back from the manifest's
settings. Trainable names: ``layers.{i}.weight``, ``layers.{i}.bias``, ``heads.{i}.weight``,
``heads.{i}.bias``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from fwdfleet.bundle import Bundle, BundleManifest
from fwdfleet.device_runtime.ff_objectives import HEADS, Array, Head, IntArray, LayerOutputs, LayerShape, layer_forward
from fwdfleet.errors import BundleError, DataError

ScoreLayers = Literal["all_but_first", "all"]
SCORE_LAYERS: tuple[ScoreLayers, ...] = ("all_but_first", "all")
Predict = Literal["goodness", "head"]
PREDICTS: tuple[Predict, ...] = ("goodness", "head")
F32 = np.float32

# Local parameter key -> trainable name pattern.
_LOCAL_NAMES = {"weight": "layers.{i}.weight", "bias": "layers.{i}.bias",
                "head_weight": "heads.{i}.weight", "head_bias": "heads.{i}.bias"}


@dataclass(frozen=True)
class FFLayout:
    """Widths, head and label embedding of an FF MLP bundle (from its manifest settings)."""

    sizes: tuple[int, ...]
    num_classes: int
    heads: Head = "none"
    head_units_per_class: int = 4
    label_scale: float = 1.0
    score_layers: ScoreLayers = "all_but_first"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or self.sizes[0] <= self.num_classes:
            raise ValueError(f"FFLayout.sizes {self.sizes} needs an input wider than num_classes and >= 1 layer")
        if self.heads not in HEADS:
            raise ValueError(f"FFLayout.heads must be one of {HEADS}, got {self.heads!r}")
        if self.score_layers not in SCORE_LAYERS:
            raise ValueError(f"FFLayout.score_layers must be one of {SCORE_LAYERS}, got {self.score_layers!r}")

    @classmethod
    def from_manifest(cls, manifest: BundleManifest) -> FFLayout:
        if manifest.kind != "ff_mlp":
            raise BundleError(f"expected an ff_mlp bundle, got kind {manifest.kind!r}; export one with "
                              "`fwdfleet export ff-mlp`")
        s = manifest.settings
        try:
            return cls(
                sizes=tuple(int(d) for d in s["layers"]),
                num_classes=int(s["num_classes"]),
                heads=s.get("heads", "none"),
                head_units_per_class=int(s.get("head_units_per_class", 4)),
                label_scale=float(s.get("label_scale", 1.0)),
                score_layers=s.get("score_layers", "all_but_first"),
                norm_eps=float(s.get("norm_eps", 1e-6)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"ff_mlp manifest settings are malformed ({e}); re-export the bundle") from e

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def in_dim(self) -> int:
        return self.sizes[0]

    def layer_shape(self, i: int) -> LayerShape:
        return LayerShape(self.sizes[i], self.sizes[i + 1], self.num_classes, self.heads,
                          self.head_units_per_class, self.norm_eps)

    def param_names(self, i: int) -> dict[str, str]:
        """Layer ``i``'s local keys -> trainable names, in the bundle's canonical order."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer index {i} is out of range for a {self.num_layers}-layer network")
        keys = ("weight", "bias") if self.heads == "none" else ("weight", "bias", "head_weight", "head_bias")
        return {k: _LOCAL_NAMES[k].format(i=i) for k in keys}

    def layer_params(self, i: int, trainables: Mapping[str, Array]) -> dict[str, Array]:
        return {k: trainables[name] for k, name in self.param_names(i).items()}

    def scored_layers(self, which: ScoreLayers | None = None) -> tuple[int, ...]:
        if (which or self.score_layers) == "all_but_first" and self.num_layers > 1:
            return tuple(range(1, self.num_layers))
        return tuple(range(self.num_layers))

    def check_data(self, x: Array, labels: IntArray | None = None) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise DataError(f"FF inputs must have shape (n, {self.in_dim}), got {x.shape}")
        if labels is not None:
            if labels.shape != (x.shape[0],):
                raise DataError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")

    def embed_labels(self, x: Array, labels: IntArray) -> Array:
        """``x`` with its first ``num_classes`` features replaced by ``label_scale * one_hot(labels)``."""
        out = np.array(x, dtype=F32, copy=True)
        out[:, : self.num_classes] = 0.0
        out[np.arange(x.shape[0]), labels] = self.label_scale
        return out

    def embed_neutral(self, x: Array) -> Array:
        out = np.array(x, dtype=F32, copy=True)
        out[:, : self.num_classes] = self.label_scale / self.num_classes
        return out

    def embed_all_labels(self, x: Array) -> Array:
        """(n * C, d0): row ``n * C + c`` is sample ``n`` with label ``c`` embedded."""
        n, c = x.shape[0], self.num_classes
        rows = np.repeat(np.asarray(x, dtype=F32), c, axis=0)
        return self.embed_labels(rows, np.tile(np.arange(c, dtype=np.int64), n))


class LayerRunner(Protocol):
    """Runs layer ``i`` of the network on a batch with the given trainable values."""

    def run(self, i: int, trainables: Mapping[str, Array], x: Array) -> LayerOutputs: ...


class NumpyLayers:
    """Layers computed in numpy (keeps the caches the closed-form gradients need)."""

    def __init__(self, layout: FFLayout) -> None:
        self.layout = layout

    def run(self, i: int, trainables: Mapping[str, Array], x: Array) -> LayerOutputs:
        return layer_forward(self.layout.layer_params(i, trainables), x, self.layout.layer_shape(i))


class OnnxLayers:
    """Layers run by onnxruntime from the bundle's ``layer_i`` graphs (inference-only hardware).

    A graph exported with a fixed batch is fed in chunks of that size (the last one padded).
    """

    def __init__(self, bundle: Bundle, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None) -> None:
        self.layout = FFLayout.from_manifest(bundle.manifest)
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BundleError(f"execution providers {missing} are not available here; choose from {available}")
        self.sessions: list[ort.InferenceSession] = []
        self.fixed_batch: list[int | None] = []
        for i in range(self.layout.num_layers):
            spec = bundle.manifest.graph(f"layer_{i}")
            self.sessions.append(ort.InferenceSession(str(bundle.graph_path(spec.name)), sess_options=options,
                                                      providers=list(providers)))
            dim = spec.inputs[0].shape[0]
            self.fixed_batch.append(dim if isinstance(dim, int) else None)
        self.outputs = ["h", "goodness"] + (["head_logits"] if self.layout.heads != "none" else [])

    def run(self, i: int, trainables: Mapping[str, Array], x: Array) -> LayerOutputs:
        feeds: dict[str, Any] = {name: np.asarray(trainables[name], dtype=F32)
                                 for name in self.layout.param_names(i).values()}
        x = np.asarray(x, dtype=F32)
        fixed, n = self.fixed_batch[i], x.shape[0]
        if fixed is None:
            results = self.sessions[i].run(self.outputs, {"x": x, **feeds})
        else:
            pad = (-n) % fixed
            xp = np.concatenate([x, np.zeros((pad, x.shape[1]), dtype=F32)]) if pad else x
            chunks = [self.sessions[i].run(self.outputs, {"x": xp[s : s + fixed], **feeds})
                      for s in range(0, xp.shape[0], fixed)]
            results = [np.concatenate([c[j] for c in chunks])[:n] for j in range(len(self.outputs))]
        head = results[2] if len(results) > 2 else None
        return LayerOutputs(h=results[0], goodness=results[1], head_logits=head)


def forward_layers(runner: LayerRunner, num_layers: int, trainables: Mapping[str, Array],
                   x: Array) -> list[LayerOutputs]:
    """Every layer's outputs on an input that already carries its label (or neutral) embedding."""
    outs: list[LayerOutputs] = []
    h = x
    for i in range(num_layers):
        outs.append(runner.run(i, trainables, h))
        h = outs[-1].h
    return outs


def label_scores(
    layout: FFLayout,
    runner: LayerRunner,
    trainables: Mapping[str, Array],
    x: Array,
    *,
    predict: Predict | None = None,
    score_layers: ScoreLayers | None = None,
) -> Array:
    """(n, C) prediction scores: label goodness summed over the scored layers (one pass per label),
    or the scored layers' head logits on the neutral input (``predict="head"``). By default as graph
    ``model`` computes them: the heads if the bundle has them, and the bundle's ``score_layers``."""
    predict = predict or ("head" if layout.heads != "none" else "goodness")
    n, c = x.shape[0], layout.num_classes
    layers = layout.scored_layers(score_layers)
    total = np.zeros((n, c), dtype=np.float64)
    if predict == "goodness":
        for i, out in enumerate(forward_layers(runner, layout.num_layers, trainables, layout.embed_all_labels(x))):
            if i in layers:
                total += out.goodness.reshape(n, c)
        return total
    if predict != "head":
        raise ValueError(f"predict must be one of {PREDICTS}, got {predict!r}")
    if layout.heads == "none":
        raise BundleError("this bundle has no per-layer heads; predict by goodness or export with --heads")
    for i, out in enumerate(forward_layers(runner, layout.num_layers, trainables, layout.embed_neutral(x))):
        if i in layers and out.head_logits is not None:
            total += out.head_logits
    return total
