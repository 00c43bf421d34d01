"""Predicting with a PFF-trained network: Goodness, Softmax, and the PON's per-layer heads.

* ``goodness``: every label embedded in turn, the label whose goodness summed over all layers but
  the first is largest (Hinton; PFF's "Goodness" classifier). ``goodness_all_layers``: summed
  over every layer.
* ``softmax``: a linear softmax classifier on the activations of all layers but the first for the
  neutral input (PFF's "Softmax" classifier), fitted after training on the training split by
  Adam on its own cross-entropy (a single linear layer: its gradient is local, no backprop
  through the network).
* ``head``: networks with per-layer heads (PON, SFF) sum the heads' logits over the scored layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fwdfleet.device_runtime.ff import FFLayout, NumpyLayers, forward_layers
from fwdfleet.device_runtime.ff_objectives import Array, log_softmax
from fwdfleet.device_runtime.ff_train import evaluate_ff
from fwdfleet.pff.config import NodeData


def activations(layout: FFLayout, trainables: Mapping[str, Array], x: Array, batch: int = 1024) -> Array:
    """Concatenated activations of the scored layers (all but the first) on the neutral input."""
    runner = NumpyLayers(layout)
    parts = []
    for s in range(0, x.shape[0], batch):
        outs = forward_layers(runner, layout.num_layers, trainables, layout.embed_neutral(x[s : s + batch]))
        parts.append(np.concatenate([outs[i].h for i in layout.scored_layers("all_but_first")], axis=1))
    return np.concatenate(parts).astype(np.float32)


def fit_softmax(features: Array, labels: np.ndarray, num_classes: int, *, epochs: int = 30, lr: float = 1e-2,
                batch: int = 128, seed: int = 0) -> tuple[Array, Array]:
    """A linear softmax classifier (W (C, D), b (C,)) fitted with Adam; features are standardised per column."""
    n, d = features.shape
    w, b = np.zeros((num_classes, d), dtype=np.float64), np.zeros(num_classes)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    t = 0
    rng = np.random.default_rng([seed, 0x50F7])
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            p = np.exp(log_softmax(features[idx] @ w.T + b))
            p[np.arange(idx.size), labels[idx]] -= 1.0
            p /= idx.size
            grads = [p.T @ features[idx], p.sum(axis=0)]
            t += 1
            for k, (param, g) in enumerate(zip((w, b), grads, strict=True)):
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                param -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
    return w, b


def evaluate(layout: FFLayout, trainables: Mapping[str, Array], train: NodeData, test: NodeData,
             *, seed: int = 0) -> dict[str, float]:
    """Test accuracy of each way of predicting that applies to this network."""
    out: dict[str, float] = {}
    if layout.heads == "none":
        out["goodness"] = evaluate_ff(layout, trainables, test.x, test.y, predict="goodness",
                                      score_layers="all_but_first").accuracy
        out["goodness_all_layers"] = evaluate_ff(layout, trainables, test.x, test.y, predict="goodness",
                                                 score_layers="all").accuracy
    else:
        out["head"] = evaluate_ff(layout, trainables, test.x, test.y, predict="head",
                                  score_layers="all_but_first").accuracy
        out["head_all_layers"] = evaluate_ff(layout, trainables, test.x, test.y, predict="head",
                                             score_layers="all").accuracy
    f_train = activations(layout, trainables, train.x)
    mean, std = f_train.mean(axis=0), f_train.std(axis=0) + 1e-6
    w, b = fit_softmax((f_train - mean) / std, train.y, layout.num_classes, seed=seed)
    scores = ((activations(layout, trainables, test.x) - mean) / std) @ w.T + b
    out["softmax"] = float(np.mean(np.argmax(scores, axis=1) == test.y))
    return out
