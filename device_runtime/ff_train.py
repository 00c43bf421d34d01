"""Layer-local training of Forward-Forward MLP bundles on a device, without backpropagation.

Each layer learns from its own objective (:mod:`device_runtime.ff_objectives`) on the
activations the layers below give it, in one of two modes:

* ``closed_form``: the layer's own gradient written out in numpy (one linear layer + relu + its
  head; nothing flows between layers), then Adam or SGD;
* ``perturbed``: perturbed inference of the layer's ONNX graph (onnxruntime via
  :class:`~device_runtime.ff.OnnxLayers`): K central differences
  ``d_k = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps)`` along perturbations ``z_k`` from the
  shared generator :mod:`fwdfleet.perturbation` (seed ``round_seed``, word ``device``,
  index ``k``, over the layer's trainables in canonical order), ``g = mean_k d_k z_k``, then
  the same optimizer. The layer loss is computed in numpy from the graph's outputs.

:func:`train_layer_step` is one step of one layer, callable alone (pipeline FF, one layer per
node); :func:`train_ff` runs all layers over local data (FedFwd: FedAvg of the returned
trainables); :func:`evaluate_ff` measures accuracy. Every random choice derives from
``FFTrainConfig.seed``: the same config and data give the same trainables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fwdfleet.bundle import Bundle, TensorSpec
from fwdfleet.device_runtime.estimator import EstimatorWorkspace, accumulate_pairs
from fwdfleet.device_runtime.ff import (
    PREDICTS,
    SCORE_LAYERS,
    FFLayout,
    LayerRunner,
    NumpyLayers,
    OnnxLayers,
    Predict,
    ScoreLayers,
    label_scores,
)
from fwdfleet.device_runtime.ff_objectives import (
    NEGATIVES,
    OBJECTIVE_HEAD,
    OBJECTIVES,
    Array,
    IntArray,
    LayerOutputs,
    Negatives,
    Objective,
    ObjectiveValue,
    layer_gradients,
    log_softmax,
    negative_labels,
    objective_value,
    uses_negatives,
)
from fwdfleet.errors import BundleError
from fwdfleet.perturbation import DISTRIBUTIONS, Distribution, split

Mode = Literal["closed_form", "perturbed"]
MODES: tuple[Mode, ...] = ("closed_form", "perturbed")
Optimizer = Literal["adam", "sgd"]
OPTIMIZERS: tuple[Optimizer, ...] = ("adam", "sgd")
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


@dataclass(frozen=True)
class FFTrainConfig:
    """How a device trains an FF bundle locally. Defaults are the calibrated ones (DESIGN.md)."""

    objective: Objective = "symmetric"
    negatives: Negatives = "adaptive"
    negative_temperature: float = 1.0  # adaptive: sample from softmax(goodness / T); 0 = most-predicted
    negative_score_layers: ScoreLayers = "all"
    mode: Mode = "closed_form"
    optimizer: Optimizer = "adam"
    lr: float = 3e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    threshold: float = 1.0
    alpha: float = 4.0
    num_perturbations: int = 8
    eps: float = 1e-2
    distribution: Distribution = "rademacher"
    train_layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("objective", self.objective in OBJECTIVES, f"one of {OBJECTIVES}"),
            ("negatives", self.negatives in NEGATIVES, f"one of {NEGATIVES}"),
            ("negative_temperature", self.negative_temperature >= 0, ">= 0"),
            ("negative_score_layers", self.negative_score_layers in SCORE_LAYERS, f"one of {SCORE_LAYERS}"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or None"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("alpha", math.isfinite(self.alpha) and self.alpha > 0, "a positive number"),
            ("num_perturbations", self.num_perturbations >= 1, ">= 1"),
            ("eps", math.isfinite(self.eps) and self.eps > 0, "a positive number"),
            ("distribution", self.distribution in DISTRIBUTIONS, f"one of {DISTRIBUTIONS}"),
            ("seed", 0 <= self.seed < 1 << 32, "an unsigned 32-bit integer"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"FFTrainConfig.{name} must be {what}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class AdamState:
    """Adam moments and step counts per trainable name (only names that were updated)."""

    t: Mapping[str, int] = field(default_factory=dict)
    m: Mapping[str, Array] = field(default_factory=dict)
    v: Mapping[str, Array] = field(default_factory=dict)


def optimizer_update(params: Mapping[str, Array], grads: Mapping[str, Array], state: AdamState, lr: float,
                     optimizer: Optimizer = "adam") -> tuple[dict[str, Array], AdamState]:
    """New values of ``params`` (names as keys) after one step along ``grads``; new state.

    Adam updates the moment arrays of ``state`` in place (the returned state holds the same arrays;
    ``params`` are not modified): one temporary per tensor instead of a dozen, with the same
    float operations in the same order as ``p - lr * m_hat / (sqrt(v_hat) + eps)``, so the result is
    bit for bit that of the textbook expression."""
    if optimizer == "sgd":
        return {k: (p - lr * grads[k]).astype(p.dtype) for k, p in params.items()}, state
    t, m, v = dict(state.t), dict(state.m), dict(state.v)
    out: dict[str, Array] = {}
    for k, p in params.items():
        g = grads[k]
        t[k] = t.get(k, 0) + 1
        if k not in m:
            m[k] = np.zeros(p.shape, np.result_type(p, g))
            v[k] = np.zeros(p.shape, np.result_type(p, g))
        mk, vk = m[k], v[k]
        tmp = np.multiply(g, 1 - _BETA1)
        mk *= _BETA1
        mk += tmp  # beta1 m + (1 - beta1) g
        np.multiply(g, 1 - _BETA2, out=tmp)
        tmp *= g
        vk *= _BETA2
        vk += tmp  # beta2 v + (1 - beta2) g g
        step = np.divide(mk, 1 - _BETA1 ** t[k])
        step *= lr  # lr m_hat
        np.divide(vk, 1 - _BETA2 ** t[k], out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += _ADAM_EPS  # sqrt(v_hat) + eps
        step /= tmp
        out[k] = np.subtract(p, step, out=step).astype(p.dtype, copy=False)
    return out, AdamState(t=t, m=m, v=v)


@dataclass(frozen=True)
class LayerBatch:
    """A layer's input: positive (or neutral) rows, their labels, and negative rows if the objective uses them."""

    x: Array
    labels: IntArray
    x_neg: Array | None = None


@dataclass(frozen=True)
class LayerStepResult:
    """``trainables``: all trainables with this layer's updated. ``pos``/``neg``: the layer's outputs
    before the update (``pos.h``/``neg.h`` feed the next layer). ``loss``: layer loss before the update."""

    trainables: dict[str, Array]
    state: AdamState
    loss: float
    pos: LayerOutputs
    neg: LayerOutputs | None
    skipped: tuple[int, ...] = ()


def step_seed(seed: int, step: int, layer: int) -> int:
    """The perturbation round seed of (config seed, step, layer): 64 bits from numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, step, layer]).generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def _layer_loss(config: FFTrainConfig, layout: FFLayout, runner: LayerRunner, i: int,
                trainables: Mapping[str, Array], batch: LayerBatch) -> tuple[ObjectiveValue, LayerOutputs,
                                                                         LayerOutputs | None]:
    pos = runner.run(i, trainables, batch.x)
    neg = runner.run(i, trainables, batch.x_neg) if uses_negatives(config.objective) and batch.x_neg is not None \
        else None
    value = objective_value(config.objective, pos=pos, neg=neg, labels=batch.labels,
                            threshold=config.threshold, alpha=config.alpha)
    return value, pos, neg


def layer_specs(layout: FFLayout, i: int, trainables: Mapping[str, Array]) -> tuple[TensorSpec, ...]:
    """Layer ``i``'s trainables in canonical order: the flat layout its perturbations cover."""
    return tuple(TensorSpec(name, tuple(trainables[name].shape)) for name in layout.param_names(i).values())


def estimate_layer_derivatives(
    i: int, trainables: Mapping[str, Array], batch: LayerBatch, config: FFTrainConfig, *, layout: FFLayout,
    runner: LayerRunner, round_seed: int, device: int = 0, indices: Iterable[int] | None = None,
) -> tuple[list[tuple[int, float]], tuple[int, ...]]:
    """Central differences of layer ``i``'s loss along ``z_k``; returns ``[(k, d_k)]`` and skipped (non-finite) k.

    The perturbed points are formed in place by the estimator's workspace (one layer-sized buffer,
    chunked regeneration, the Rademacher signs kept for the ``-eps`` pass)."""
    ws = EstimatorWorkspace(layer_specs(layout, i, trainables))
    ws.load(trainables)
    moved = {**trainables, **ws.feed}  # the layer's trainables read from the perturbed buffer
    pairs: list[tuple[int, float]] = []
    skipped: list[int] = []
    for k in indices if indices is not None else range(config.num_perturbations):
        losses = []
        for sign in (1.0, -1.0):
            ws.perturb(round_seed, device, k, config.distribution, sign * config.eps)
            losses.append(_layer_loss(config, layout, runner, i, moved, batch)[0].mean)
        d = (losses[0] - losses[1]) / (2 * config.eps)
        if math.isfinite(d):
            pairs.append((k, d))
        else:
            skipped.append(k)
    return pairs, tuple(skipped)


def reconstruct_layer_gradient(
    specs: tuple[TensorSpec, ...], pairs: Iterable[tuple[int, float]], *, round_seed: int, device: int = 0,
    distribution: Distribution = "rademacher",
) -> dict[str, Array]:
    """``g = mean_k d_k z_k`` over the layer's trainables (what an aggregator would also compute)."""
    pairs = list(pairs)
    n = sum(t.size for t in specs)
    g = accumulate_pairs(pairs, round_seed, device, distribution, n, scale=1.0 / max(1, len(pairs)))
    return {name: np.array(v) for name, v in split(g, specs).items()}


def train_layer_step(
    layer_index: int,
    trainables: Mapping[str, Array],
    batch: LayerBatch,
    config: FFTrainConfig,
    *,
    layout: FFLayout,
    runner: LayerRunner | None = None,
    state: AdamState | None = None,
    round_seed: int | None = None,
    device: int = 0,
) -> LayerStepResult:
    """One optimizer step of layer ``layer_index`` on its own objective; other layers are untouched.

    ``runner`` runs the layer (numpy by default; closed-form mode needs numpy outputs).
    In perturbed mode ``round_seed`` seeds the perturbations (default: :func:`step_seed` of
    ``(config.seed, 0, layer_index)``).
    """
    state = state or AdamState()
    names = layout.param_names(layer_index)
    if config.mode == "closed_form":
        runner = runner if isinstance(runner, NumpyLayers) else NumpyLayers(layout)
        value, pos, neg = _layer_loss(config, layout, runner, layer_index, trainables, batch)
        local = layout.layer_params(layer_index, trainables)
        grads_local = layer_gradients(local, layout.layer_shape(layer_index), value, pos, neg)
        grads = {names[k]: g for k, g in grads_local.items()}
        skipped: tuple[int, ...] = ()
    else:
        runner = runner or NumpyLayers(layout)
        value, pos, neg = _layer_loss(config, layout, runner, layer_index, trainables, batch)
        seed = round_seed if round_seed is not None else step_seed(config.seed, 0, layer_index)
        pairs, skipped = estimate_layer_derivatives(layer_index, trainables, batch, config, layout=layout,
                                                    runner=runner, round_seed=seed, device=device)
        grads = reconstruct_layer_gradient(layer_specs(layout, layer_index, trainables), pairs,
                                           round_seed=seed, device=device, distribution=config.distribution)
    params = {name: trainables[name] for name in names.values()}
    if not math.isfinite(value.mean) or not all(np.all(np.isfinite(g)) for g in grads.values()):
        return LayerStepResult(dict(trainables), state, value.mean, pos, neg, skipped)  # never apply NaN/inf
    new_params, state = optimizer_update(params, grads, state, config.lr, config.optimizer)
    return LayerStepResult({**trainables, **new_params}, state, value.mean, pos, neg, skipped)


@dataclass(frozen=True)
class FFTrainResult:
    trainables: dict[str, Array]
    state: AdamState
    metrics: dict[str, float]


def _check_objective(config: FFTrainConfig, layout: FFLayout) -> None:
    head = OBJECTIVE_HEAD[config.objective]
    if head != "none" and layout.heads != head:
        raise BundleError(f"objective {config.objective!r} trains a {head!r} head per layer but this bundle has "
                          f"heads={layout.heads!r}; export it with `fwdfleet export ff-mlp --heads {head}`")


def train_ff(
    bundle: Bundle | FFLayout,
    x: Array,
    y: IntArray,
    config: FFTrainConfig,
    *,
    trainables: Mapping[str, Array] | None = None,
    state: AdamState | None = None,
    runner: LayerRunner | None = None,
) -> FFTrainResult:
    """Train every layer (or ``config.train_layers``) on local data; returns new trainables and metrics.

    ``bundle`` may be a bare :class:`FFLayout` in closed-form mode (with ``trainables`` given).
    Perturbed mode runs the bundle's layer graphs unless another ``runner`` is given.
    """
    layout = bundle if isinstance(bundle, FFLayout) else FFLayout.from_manifest(bundle.manifest)
    _check_objective(config, layout)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    layout.check_data(x, y)
    if trainables is None:
        if isinstance(bundle, FFLayout):
            raise ValueError("train_ff with a bare FFLayout needs trainables=...")
        trainables = bundle.load_trainables()
    if runner is None:
        if config.mode == "perturbed" and isinstance(bundle, Bundle):
            runner = OnnxLayers(bundle)
        else:
            runner = NumpyLayers(layout)
    current = dict(trainables)
    state = state or AdamState()
    train_layers = config.train_layers if config.train_layers is not None else tuple(range(layout.num_layers))
    n = x.shape[0]
    per_epoch = max(1, math.ceil(n / config.batch_size))
    total = per_epoch * config.epochs if config.max_steps is None else min(config.max_steps, per_epoch * config.epochs)
    losses = np.zeros(layout.num_layers)
    skipped = 0
    start = time.perf_counter()
    for step in range(total):
        epoch, pos_in_epoch = divmod(step, per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(n)
        idx = order[pos_in_epoch * config.batch_size : (pos_in_epoch + 1) * config.batch_size]
        batch = _first_batch(layout, runner, current, x[idx], y[idx], idx, config, step)
        for i in range(layout.num_layers):
            if i in train_layers:
                res = train_layer_step(i, current, batch, config, layout=layout, runner=runner, state=state,
                                       round_seed=step_seed(config.seed, step, i))
                current, state = res.trainables, res.state
                losses[i] += res.loss
                skipped += len(res.skipped)
                pos, neg = res.pos, res.neg
            else:
                pos = runner.run(i, current, batch.x)
                neg = runner.run(i, current, batch.x_neg) if batch.x_neg is not None else None
            batch = LayerBatch(pos.h, batch.labels, neg.h if neg is not None else None)
    metrics: dict[str, float] = {f"loss_layer_{i}": float(losses[i] / max(total, 1)) for i in train_layers}
    metrics.update(steps=float(total), samples=float(min(total * config.batch_size, n * config.epochs)),
                   skipped_perturbations=float(skipped), seconds=time.perf_counter() - start)
    return FFTrainResult(current, state, metrics)


def _first_batch(layout: FFLayout, runner: LayerRunner, trainables: Mapping[str, Array], xb: Array, yb: IntArray,
                 idx: IntArray, config: FFTrainConfig, step: int) -> LayerBatch:
    if not uses_negatives(config.objective):
        return LayerBatch(layout.embed_neutral(xb), yb)
    rng = np.random.default_rng([config.seed, 1_000_003, step])
    scores = None
    if config.negatives == "adaptive":
        scores = label_scores(layout, runner, trainables, xb, predict="goodness",
                              score_layers=config.negative_score_layers)
    neg = negative_labels(config.negatives, yb, layout.num_classes, rng, scores=scores, sample_ids=idx,
                          temperature=config.negative_temperature, seed=config.seed)
    return LayerBatch(layout.embed_labels(xb, yb), yb, layout.embed_labels(xb, neg))


@dataclass(frozen=True)
class FFEvaluation:
    accuracy: float
    loss: float  # mean cross-entropy of the prediction scores
    num_samples: int


def evaluate_ff(
    layout: FFLayout,
    trainables: Mapping[str, Array],
    x: Array,
    y: IntArray,
    *,
    predict: Predict | None = None,
    score_layers: ScoreLayers | None = None,
    runner: LayerRunner | None = None,
    batch_size: int = 256,
) -> FFEvaluation:
    """Accuracy of the label scores (:func:`~device_runtime.ff.label_scores`); ``predict`` defaults to
    the heads when the bundle has them, else goodness; ``score_layers`` to the bundle's setting."""
    if predict is not None and predict not in PREDICTS:
        raise ValueError(f"predict must be one of {PREDICTS}, got {predict!r}")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    layout.check_data(x, y)
    runner = runner or NumpyLayers(layout)
    correct, loss = 0, 0.0
    for s in range(0, x.shape[0], batch_size):
        scores = label_scores(layout, runner, trainables, x[s : s + batch_size], predict=predict,
                              score_layers=score_layers)
        yb = y[s : s + batch_size]
        correct += int(np.sum(np.argmax(scores, axis=1) == yb))
        loss -= float(np.sum(log_softmax(scores)[np.arange(yb.size), yb]))
    n = max(x.shape[0], 1)
    return FFEvaluation(accuracy=correct / n, loss=loss / n, num_samples=x.shape[0])
