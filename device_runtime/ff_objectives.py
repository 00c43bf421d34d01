"""Forward-Forward layer math in numpy: one layer's forward pass, its local objectives, and their
closed-form gradients.

A layer is ``xn = x / sqrt(mean(x**2) + eps)``, ``a = xn @ W.T + b``, ``h = relu(a)``,
``goodness = mean(h**2)``, with an optional head on ``h`` (see ``export/ff_mlp.py`` for the
graph contract these functions mirror). The normalisation acts on the layer's *input*, which is
not trainable, so a layer's gradient never passes through it, nor through any other layer:
these gradients are local by construction (no backprop through the network).

Objectives (the loss of one sample, ``g`` = goodness, ``t`` = threshold, ``a`` = alpha):

* ``hinton``: ``softplus(a (t - g_pos)) + softplus(a (g_neg - t))`` (Hinton 2022, threshold);
* ``symmetric``: ``softplus(-a (g_pos - g_neg))`` (calibrated: a = 4, +3 points over hinton);
* ``sff``: ``logsumexp(G) - G[y]`` over the class-goodness head ``G`` (SFF, no negatives);
* ``pon``: ``logsumexp(s) - s[y]`` over the per-layer softmax head ``s`` (PFF's PON).

``hinton`` and ``symmetric`` need negative data: the same input with a wrong label embedded,
chosen by :func:`negative_labels` (``adaptive``: hard negatives sampled from the softmax of the
network's goodness over the wrong labels, or its most-predicted wrong label at temperature 0;
``random``; ``fixed``: one wrong label per sample for the whole training).

Parameter names here are the layer-local ``weight``, ``bias``, ``head_weight``, ``head_bias``.
Functions work in whatever float dtype they are given (float64 for gradient checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Objective = Literal["hinton", "symmetric", "sff", "pon"]
OBJECTIVES: tuple[Objective, ...] = ("hinton", "symmetric", "sff", "pon")
Negatives = Literal["adaptive", "random", "fixed"]
NEGATIVES: tuple[Negatives, ...] = ("adaptive", "random", "fixed")
Head = Literal["none", "softmax", "class-goodness"]
HEADS: tuple[Head, ...] = ("none", "softmax", "class-goodness")
# The head an objective trains (and needs in the bundle); "none": the objective uses goodness only.
OBJECTIVE_HEAD: dict[Objective, Head] = {
    "hinton": "none", "symmetric": "none", "sff": "class-goodness", "pon": "softmax"
}

Array = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.int64]


def uses_negatives(objective: Objective) -> bool:
    return OBJECTIVE_HEAD[objective] == "none"


@dataclass(frozen=True)
class LayerShape:
    """Widths and head of one layer."""

    d_in: int
    d_out: int
    num_classes: int
    head: Head = "none"
    head_units_per_class: int = 1
    norm_eps: float = 1e-6

    @property
    def head_width(self) -> int:
        return self.num_classes * (self.head_units_per_class if self.head == "class-goodness" else 1)


@dataclass(frozen=True)
class LayerOutputs:
    """A layer's outputs on a batch; ``xn`` and ``z`` (head pre-activations) are kept for gradients."""

    h: Array
    goodness: Array
    head_logits: Array | None = None
    xn: Array | None = None
    z: Array | None = None


def rms_normalize(x: Array, eps: float) -> Array:
    """Scale each row to length ``sqrt(d)`` (mean square 1)."""
    out: Array = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps)
    return out


def layer_forward(params: Mapping[str, Array], x: Array, shape: LayerShape) -> LayerOutputs:
    xn = rms_normalize(x, shape.norm_eps)
    h = np.maximum(xn @ params["weight"].T + params["bias"], 0)
    goodness = np.mean(h * h, axis=1)
    if shape.head == "none":
        return LayerOutputs(h=h, goodness=goodness, xn=xn)
    z = h @ params["head_weight"].T + params["head_bias"]
    if shape.head == "softmax":
        return LayerOutputs(h=h, goodness=goodness, head_logits=z, xn=xn, z=z)
    groups = z.reshape(z.shape[0], shape.num_classes, shape.head_units_per_class)
    return LayerOutputs(h=h, goodness=goodness, head_logits=np.mean(groups * groups, axis=2), xn=xn, z=z)


def softplus(t: Array) -> Array:
    out: Array = np.logaddexp(0.0, t)
    return out


def sigmoid(t: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * t))
    return out


def log_softmax(s: Array) -> Array:
    shifted = s - np.max(s, axis=1, keepdims=True)
    out: Array = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return out


@dataclass(frozen=True)
class ObjectiveValue:
    """Per-sample loss and the gradient of the *batch-mean* loss w.r.t. the layer outputs it uses."""

    loss: Array
    d_goodness_pos: Array | None = None
    d_goodness_neg: Array | None = None
    d_head_logits: Array | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.loss))


def objective_value(
    objective: Objective,
    *,
    pos: LayerOutputs,
    neg: LayerOutputs | None = None,
    labels: IntArray | None = None,
    threshold: float = 1.0,
    alpha: float = 4.0,
) -> ObjectiveValue:
    """The layer objective on outputs of the positive (or neutral) batch and, if used, the negative one."""
    n = pos.goodness.shape[0]
    if uses_negatives(objective):
        if neg is None:
            raise ValueError(f"objective {objective!r} needs the negative batch's outputs (neg=...)")
        gp, gn = pos.goodness, neg.goodness
        loss: Array
        if objective == "hinton":
            loss = softplus(alpha * (threshold - gp)) + softplus(alpha * (gn - threshold))
            dgp = -alpha * sigmoid(alpha * (threshold - gp)) / n
            dgn = alpha * sigmoid(alpha * (gn - threshold)) / n
        else:
            loss = softplus(-alpha * (gp - gn))
            dgp = -alpha * sigmoid(-alpha * (gp - gn)) / n
            dgn = -dgp
        return ObjectiveValue(loss=loss, d_goodness_pos=dgp, d_goodness_neg=dgn)
    if pos.head_logits is None:
        raise ValueError(f"objective {objective!r} needs a layer head ({OBJECTIVE_HEAD[objective]}); export one")
    if labels is None:
        raise ValueError(f"objective {objective!r} needs the labels")
    logp = log_softmax(pos.head_logits)
    ce: Array = -logp[np.arange(n), labels]
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1.0
    return ObjectiveValue(loss=ce, d_head_logits=d / n)


def _d_preactivation(
    params: Mapping[str, Array], shape: LayerShape, out: LayerOutputs, d_goodness: Array | None,
    d_head: Array | None, grads: dict[str, Array],
) -> Array:
    """Gradient w.r.t. ``a`` for one batch; accumulates the head's gradients into ``grads``."""
    dh = np.zeros_like(out.h)
    if d_goodness is not None:
        dh += d_goodness[:, None] * (2.0 / shape.d_out) * out.h
    if d_head is not None:
        if out.z is None:
            raise ValueError("the head gradient needs the head pre-activations (numpy layer_forward outputs)")
        if shape.head == "softmax":
            dz = d_head
        else:
            m = shape.head_units_per_class
            dz = np.repeat(d_head, m, axis=1) * (2.0 / m) * out.z
        grads["head_weight"] = grads.get("head_weight", 0) + dz.T @ out.h
        grads["head_bias"] = grads.get("head_bias", 0) + dz.sum(axis=0)
        dh += dz @ params["head_weight"]
    da: Array = dh * (out.h > 0)
    return da


def layer_gradients(
    params: Mapping[str, Array],
    shape: LayerShape,
    value: ObjectiveValue,
    pos: LayerOutputs,
    neg: LayerOutputs | None = None,
) -> dict[str, Array]:
    """Closed-form gradient of ``value.mean`` w.r.t. the layer's own parameters (same keys as ``params``)."""
    grads: dict[str, Array] = {}
    batches = [(pos, value.d_goodness_pos, value.d_head_logits)]
    if neg is not None and value.d_goodness_neg is not None:
        batches.append((neg, value.d_goodness_neg, None))
    for out, dg, dhead in batches:
        if out.xn is None:
            raise ValueError("layer_gradients needs numpy layer_forward outputs (with xn)")
        da = _d_preactivation(params, shape, out, dg, dhead, grads)
        grads["weight"] = grads.get("weight", 0) + da.T @ out.xn
        grads["bias"] = grads.get("bias", 0) + da.sum(axis=0)
    for name in params:  # a head the objective does not use gets a zero gradient
        grads.setdefault(name, np.zeros_like(params[name]))
    return {k: np.asarray(v, dtype=params[k].dtype) for k, v in grads.items() if k in params}


def negative_labels(
    strategy: Negatives,
    labels: IntArray,
    num_classes: int,
    rng: np.random.Generator,
    *,
    scores: Array | None = None,
    sample_ids: IntArray | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> IntArray:
    """A wrong label per sample.

    ``adaptive`` needs ``scores`` (batch, C) (the network's label goodness): it samples a wrong
    label from ``softmax(scores / temperature)`` (hard negatives), or takes the most-predicted
    wrong label when ``temperature == 0``. ``fixed`` needs ``sample_ids``: sample ``i`` always gets
    the same wrong label (a hash of ``(seed, i)``). ``random`` draws uniformly among wrong labels.
    """
    n = labels.shape[0]
    if strategy == "random":
        out: IntArray = (labels + rng.integers(1, num_classes, size=n)) % num_classes
        return out
    if strategy == "fixed":
        if sample_ids is None:
            raise ValueError("fixed negatives need sample_ids (the samples' indices in the local dataset)")
        mixed = (sample_ids.astype(np.uint64) * np.uint64(2654435761) + np.uint64(seed % (1 << 32))) % np.uint64(
            num_classes - 1
        )
        fixed: IntArray = (labels + 1 + mixed.astype(np.int64)) % num_classes
        return fixed
    if strategy != "adaptive":
        raise ValueError(f"unknown negatives {strategy!r}; choose one of {NEGATIVES}")
    if scores is None:
        raise ValueError("adaptive negatives need the network's label scores (batch, num_classes)")
    masked = np.array(scores, dtype=np.float64)
    masked[np.arange(n), labels] = -np.inf
    if temperature == 0:
        hard: IntArray = np.argmax(masked, axis=1).astype(np.int64)
        return hard
    p = np.exp(log_softmax(masked / temperature))
    u = rng.random((n, 1))
    picks = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), num_classes - 1)
    # guard against rounding landing on the true label
    picks = np.where(picks == labels, (labels + 1) % num_classes, picks)
    sampled: IntArray = picks.astype(np.int64)
    return sampled
