"""One PFF task: train one layer for one chapter (or, federated, one node's part of it) on the output
of the (frozen) layers below.

The layers below are at the version this chapter needs (see :mod:`pff.schedule`) and do not change
during the chapter, so their output on the node's data is computed once per chapter (not per
step) and the layer then takes ``E / S`` epochs of Adam steps with the device runtime's
:func:`~device_runtime.ff_train.train_layer_step` (closed-form local gradients; nothing flows
between layers). Every random choice derives from ``(seed, layer, chapter)``, so a task gives the
same parameters on whichever node runs it, and again after a restart.

Negative labels (for the ``hinton`` and ``symmetric`` objectives):

* ``fixed`` (FixedNEG): one wrong label per sample, drawn once for the whole run;
* ``random`` (RandomNEG): re-drawn at each chapter (the same for every layer of the chapter);
* ``adaptive`` (AdaptiveNEG): per task, from the goodness of the layers below and of this layer
  (its previous version) for every label: the most-predicted wrong label at temperature 0, else
  sampled from the softmax of the wrong labels' goodness. The positive and negative inputs are
  read off that all-labels pass, so AdaptiveNEG costs ``C`` forwards of the layers below.

``pon`` (the Performance-Optimized Network) and ``sff`` use a per-layer head on the neutral input
instead of negatives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fwdfleet.device_runtime.ff import FFLayout, NumpyLayers
from fwdfleet.device_runtime.ff_objectives import Array, IntArray, layer_forward, negative_labels, uses_negatives
from fwdfleet.device_runtime.ff_train import AdamState, FFTrainConfig, LayerBatch, train_layer_step
from fwdfleet.pff.config import NodeData, RingAdam
from fwdfleet.pff.schedule import Task

Params = dict[str, Array]
_CHUNK = 512  # samples per all-labels chunk (C rows each)


@dataclass(frozen=True)
class ChapterResult:
    params: Params
    loss: float
    input_seconds: float
    train_seconds: float
    state: AdamState  # the optimizer's state at the end (to hand on, see ``train_chapter``)


class ActivationCache:
    """Outputs of layers ``0..j`` (all at one version) on this node's rows, keyed ``(rows, j, version)``.

    ``rows`` names the input rows (``"pos"`` or a negative-label key). Storing layer ``j``'s output drops
    the shallower outputs of the same rows and version (the chain goes on from the deepest one), and
    :meth:`retain` drops the versions the node's remaining tasks no longer need.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, int, int], Array] = {}

    def get(self, rows: str, j: int, version: int) -> Array | None:
        return self._data.get((rows, j, version))

    def put(self, rows: str, j: int, version: int, value: Array) -> None:
        for key in [k for k in self._data if k[0] == rows and k[2] == version and k[1] < j]:
            del self._data[key]
        self._data[(rows, j, version)] = value

    def retain(self, versions: set[int]) -> None:
        """Keep only outputs at ``versions``."""
        for key in [k for k in self._data if k[2] not in versions]:
            del self._data[key]


_ADAM = "adam/"  # prefix of the optimizer tensors a ring hand-off carries beside the layer's parameters


def continues_adam(task: Task, ring_adam: RingAdam) -> bool:
    """Whether ``task`` starts from the Adam state its ring predecessor handed on: a federated
    chapter's part after the first, with ``PFFConfig.ring_adam == "hand-on"``."""
    return ring_adam == "hand-on" and task.part > 0


def hands_adam_on(task: Task, ring_adam: RingAdam) -> bool:
    """Whether ``task`` publishes Adam's state beside its parameters (:func:`with_adam_state`): every
    part of a chapter but the last, with ``"hand-on"`` (the chapter's final version, which the
    layers above read, carries the parameters only)."""
    return ring_adam == "hand-on" and task.part < task.parts - 1


def with_adam_state(params: Params, state: AdamState) -> Params:
    """``params`` plus Adam's state as float32 tensors ``adam/m/<name>``, ``adam/v/<name>`` and
    ``adam/t/<name>`` (the step count, exact in float32 below 2**24): what a federated ring's hand-off
    inside a chapter publishes, so that the next node continues the optimizer (``PFFConfig.ring_adam``)."""
    out = dict(params)
    for name in state.m:
        out[f"{_ADAM}m/{name}"] = np.asarray(state.m[name], dtype=np.float32)
        out[f"{_ADAM}v/{name}"] = np.asarray(state.v[name], dtype=np.float32)
        out[f"{_ADAM}t/{name}"] = np.array([state.t[name]], dtype=np.float32)
    return out


def split_adam_state(tensors: Mapping[str, Array]) -> tuple[Params, AdamState | None]:
    """The layer's parameters and the Adam state that :func:`with_adam_state` added (None if none);
    the moments are writable copies (Adam updates them in place)."""
    params = {k: v for k, v in tensors.items() if not k.startswith(_ADAM)}
    names = [k[len(_ADAM) + 2 :] for k in tensors if k.startswith(_ADAM + "m/")]
    if not names:
        return params, None
    return params, AdamState(t={n: int(tensors[f"{_ADAM}t/{n}"][0]) for n in names},
                             m={n: np.array(tensors[f"{_ADAM}m/{n}"], dtype=np.float32) for n in names},
                             v={n: np.array(tensors[f"{_ADAM}v/{n}"], dtype=np.float32) for n in names})


def chain(layout: FFLayout, lower: Mapping[int, Params], x0: Array, upto: int, version: int,
          cache: ActivationCache | None, rows: str) -> Array:
    """Output of layers ``0..upto - 1`` (params ``lower[j]``, all at ``version``) on ``x0``; ``x0`` if upto = 0."""
    start, h = 0, x0
    if cache is not None:
        for j in range(upto - 1, -1, -1):
            hit = cache.get(rows, j, version)
            if hit is not None:
                start, h = j + 1, hit
                break
    for j in range(start, upto):
        h = layer_forward(_local(layout, j, lower[j]), h, layout.layer_shape(j)).h.astype(np.float32)
        if cache is not None:
            cache.put(rows, j, version, h)
    return h


def _local(layout: FFLayout, j: int, params: Mapping[str, Array]) -> dict[str, Array]:
    return layout.layer_params(j, params)


def _adaptive_inputs(layout: FFLayout, task: Task, lower: Mapping[int, Params], own: Params, data: NodeData,
                     config: FFTrainConfig) -> tuple[Array, Array]:
    """(positive, negative) inputs of layer ``task.layer`` with AdaptiveNEG labels, from one all-labels pass."""
    n, c, layer = data.y.size, layout.num_classes, task.layer
    pos = np.empty((n, layout.sizes[layer]), dtype=np.float32)
    neg = np.empty_like(pos)
    rng = np.random.default_rng([config.seed, 0xADA, layer, task.chapter] + ([task.part] if task.parts > 1 else []))
    levels = {**lower, layer: own}
    for s in range(0, n, _CHUNK):
        xb, yb = data.x[s : s + _CHUNK], data.y[s : s + _CHUNK]
        m = yb.size
        h = layout.embed_all_labels(xb)
        scores = np.zeros((m, c))
        inputs = h
        for j in range(layer + 1):
            if j == layer:
                inputs = h
            out = layer_forward(_local(layout, j, levels[j]), h, layout.layer_shape(j))
            scores += out.goodness.reshape(m, c)
            h = out.h.astype(np.float32)
        labels = negative_labels("adaptive", yb, c, rng, scores=scores, temperature=config.negative_temperature)
        rows = inputs.reshape(m, c, -1)
        pos[s : s + m] = rows[np.arange(m), yb]
        neg[s : s + m] = rows[np.arange(m), labels]
    return pos, neg


def layer_inputs(layout: FFLayout, task: Task, lower: Mapping[int, Params], own: Params, data: NodeData,
                 config: FFTrainConfig, cache: ActivationCache | None = None) -> tuple[Array, Array | None]:
    """Layer ``task.layer``'s (positive or neutral, negative or None) inputs for the whole chapter."""
    version = task.lower_version
    if not uses_negatives(config.objective):
        return chain(layout, lower, layout.embed_neutral(data.x), task.layer, version, cache, "neutral"), None
    if config.negatives == "adaptive":
        return _adaptive_inputs(layout, task, lower, own, data, config)
    pos = chain(layout, lower, layout.embed_labels(data.x, data.y), task.layer, version, cache, "pos")
    c = layout.num_classes
    if config.negatives == "fixed":
        labels = negative_labels("fixed", data.y, c, np.random.default_rng(0), sample_ids=data.ids, seed=config.seed)
        key = "neg-fixed"
    else:
        labels = negative_labels("random", data.y, c, np.random.default_rng([config.seed, 0x4E45, task.chapter]))
        key = f"neg-random-{task.chapter}"
    neg = chain(layout, lower, layout.embed_labels(data.x, labels), task.layer, version, cache, key)
    return pos, neg


def train_chapter(
    layout: FFLayout,
    task: Task,
    lower: Mapping[int, Params],
    own: Params,
    data: NodeData,
    config: FFTrainConfig,
    chapter_epochs: int,
    *,
    cache: ActivationCache | None = None,
    on_step: Callable[[int, int], None] | None = None,
    state: AdamState | None = None,
) -> ChapterResult:
    """Train layer ``task.layer`` (starting from ``own``) for ``chapter_epochs`` epochs on ``data``.

    Adam starts afresh (as the nodes do at every task) unless ``state`` is given, e.g. the state
    a ring's previous part ended with (``benchmarks/pff_ring_adam.py``); the state at the end is
    ``ChapterResult.state`` (its moment arrays may be the given state's, updated in place)."""
    t0 = time.perf_counter()
    x_pos, x_neg = layer_inputs(layout, task, lower, own, data, config, cache)
    t1 = time.perf_counter()
    n = data.y.size
    per_epoch = max(1, -(-n // config.batch_size))
    total = per_epoch * chapter_epochs
    params: Params = {name: np.array(own[name], dtype=np.float32)
                      for name in layout.param_names(task.layer).values()}
    state = AdamState() if state is None else state
    runner = NumpyLayers(layout)
    losses = []
    labels: IntArray = data.y
    for epoch in range(chapter_epochs):
        key = [config.seed, task.layer, task.chapter, epoch] + ([task.part] if task.parts > 1 else [])
        order = np.random.default_rng(key).permutation(n)
        for b in range(per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            batch = LayerBatch(x_pos[idx], labels[idx], None if x_neg is None else x_neg[idx])
            res = train_layer_step(task.layer, params, batch, config, layout=layout, runner=runner, state=state)
            params, state = res.trainables, res.state
            losses.append(res.loss)
            if on_step is not None:
                on_step(epoch * per_epoch + b + 1, total)
    t2 = time.perf_counter()
    return ChapterResult(params=params, loss=float(np.mean(losses)) if losses else float("nan"),
                         input_seconds=t1 - t0, train_seconds=t2 - t1, state=state)
