"""Block-local training of Scalable Forward-Forward CNN bundles (kind ``ff_cnn``) on a device.

No torch, no backward pass through the network: each block learns from its own SFF loss on the
output the blocks below give it (their training-mode output, taken as data). Two modes:

* ``gradient``: run the block's **gradient graph** ``grad_i`` with onnxruntime (inference
  operators only): it returns the exact gradient of the block's batch-mean loss with respect to
  the block's trainables, the block output ``h`` for the next block, and the updated batch-norm
  statistics; then Adam or SGD in numpy (:func:`~device_runtime.ff_train.optimizer_update`).
* ``perturbed``: perturbed inference of the block's graph ``block_i``: K central differences
  ``(L(w + eps z_k) - L(w - eps z_k)) / (2 eps)`` along perturbations from the shared generator
  (seed from :func:`~device_runtime.ff_train.step_seed`), ``g = mean_k d_k z_k``, the same
  optimizer; one more forward at ``w`` gives ``h`` and the statistics.

Batch-norm running statistics are state (``state.npz`` in the bundle): the device carries them
and replaces them by the graphs' ``new.*`` outputs after every step. Prediction runs graph
``model`` (inference-mode batch norm): ``logits`` sums every head's class goodness,
``logits_last`` is the last head's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fwdfleet.bundle import Bundle, TensorSpec
from fwdfleet.device_runtime.estimator import EstimatorWorkspace
from fwdfleet.device_runtime.ff_objectives import Array, IntArray
from fwdfleet.device_runtime.ff_train import AdamState, optimizer_update, reconstruct_layer_gradient, step_seed
from fwdfleet.errors import BundleError, DataError
from fwdfleet.perturbation import DISTRIBUTIONS, Distribution

Mode = Literal["gradient", "perturbed"]
MODES: tuple[Mode, ...] = ("gradient", "perturbed")
Optimizer = Literal["adam", "sgd"]


@dataclass(frozen=True)
class SFFTrainConfig:
    """How a device trains an ff_cnn bundle's blocks (all blocks on every minibatch)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: Optimizer = "adam"
    mode: Mode = "gradient"
    eps: float = 1e-2
    num_perturbations: int = 1
    distribution: Distribution = "rademacher"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 2, ">= 2 (batch norm)"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive finite number"),
            ("optimizer", self.optimizer in ("adam", "sgd"), "'adam' or 'sgd'"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("eps", math.isfinite(self.eps) and self.eps > 0, "a positive finite number"),
            ("num_perturbations", self.num_perturbations >= 1, ">= 1"),
            ("distribution", self.distribution in DISTRIBUTIONS, f"one of {DISTRIBUTIONS}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"SFFTrainConfig.{name} must be {what}, got {getattr(self, name)!r}")


class CNNRunner:
    """The graphs of an ff_cnn bundle, each session made when first used (one thread by default)."""

    def __init__(self, bundle: Bundle, *, threads: int = 1) -> None:
        if bundle.manifest.kind != "ff_cnn":
            raise BundleError(f"block-local SFF training needs an ff_cnn bundle, got kind {bundle.manifest.kind!r}")
        self.bundle = bundle
        self.threads = threads
        s = bundle.manifest.settings
        self.num_blocks = len(s["blocks"])
        self.num_classes = int(s["num_classes"])
        self.input_shape = (int(s["in_channels"]), int(s["image_size"][0]), int(s["image_size"][1]))
        self._sessions: dict[str, Any] = {}

    def graph(self, name: str) -> Any:
        return self.bundle.manifest.graph(name)

    def block_trainables(self, i: int) -> tuple[str, ...]:
        return tuple(self.graph(f"grad_{i}").trainables)

    def block_state(self, i: int) -> tuple[str, ...]:
        g = self.graph(f"grad_{i}")
        return tuple(t.name for t in g.data_inputs if t.name not in ("x", "labels"))

    def session(self, name: str) -> Any:
        if name not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            self._sessions[name] = ort.InferenceSession(str(self.bundle.graph_path(name)), opts,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[name]

    def run(self, name: str, feeds: Mapping[str, Any]) -> dict[str, Array]:
        spec = self.graph(name)
        outs = self.session(name).run([t.name for t in spec.outputs], {t.name: feeds[t.name] for t in spec.inputs})
        return dict(zip((t.name for t in spec.outputs), outs, strict=True))

    def check_data(self, x: Array, labels: IntArray | None = None) -> None:
        """Images (n, C, H, W) of the bundle's shape and labels in range, or a DataError naming the field."""
        if x.ndim != 4:
            raise DataError(f"images must be (n, channels, height, width), got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_shape[0]:
            raise DataError(f"images have {x.shape[1]} channels but the bundle's in_channels is "
                            f"{self.input_shape[0]}")
        if tuple(x.shape[2:]) != self.input_shape[1:]:
            raise DataError(f"images are {x.shape[2]}x{x.shape[3]} but the bundle's image_size is "
                            f"{self.input_shape[1]}x{self.input_shape[2]}")
        if labels is not None:
            if labels.shape != (x.shape[0],):
                raise DataError(f"labels must be one per image ({x.shape[0]}), got shape {tuple(labels.shape)}")
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"labels must be in [0, {self.num_classes}) (the bundle's num_classes), got "
                                f"range [{labels.min()}, {labels.max()}]")


def load_state(bundle: Bundle) -> dict[str, Array]:
    """The batch-norm running statistics shipped in an ff_cnn bundle."""
    s = bundle.manifest.settings
    try:
        with np.load(bundle.path / str(s["state_file"]), allow_pickle=False) as z:
            return {k: np.array(z[k], np.float32) for k in s["state"]}
    except (OSError, KeyError, ValueError) as e:
        raise BundleError(f"{bundle.path} has no readable batch-norm state ({s.get('state_file')}): {e}") from e


@dataclass(frozen=True)
class BlockStep:
    """One block's step: the block's updated trainables, the new statistics, the loss before the
    update and the block's output ``h`` (the next block's input)."""

    params: dict[str, Array]
    state: dict[str, Array]
    loss: float
    h: Array
    forwards: int


def block_step(runner: CNNRunner, i: int, trainables: Mapping[str, Array], state: Mapping[str, Array],
               x: Array, labels: IntArray, config: SFFTrainConfig, opt: AdamState, *,
               step: int = 0) -> tuple[BlockStep, AdamState]:
    """One optimizer step of block ``i`` on its own loss (the other blocks are not touched)."""
    names = runner.block_trainables(i)
    snames = runner.block_state(i)
    feeds: dict[str, Any] = {"x": x, "labels": labels, **{n: trainables[n] for n in names},
                             **{n: state[n] for n in snames}}
    if config.mode == "gradient":
        out = runner.run(f"grad_{i}", feeds)
        grads = {n: out[f"grad.{n}"] for n in names}
        loss, forwards = float(out["loss"]), 1
    else:
        out = runner.run(f"block_{i}", feeds)
        loss = float(out["loss"].mean())
        specs = tuple(TensorSpec(n, tuple(trainables[n].shape)) for n in names)
        ws = EstimatorWorkspace(specs)
        ws.load({n: trainables[n] for n in names})
        moved = {**feeds, **ws.feed}
        seed = step_seed(config.seed, step, i)
        pairs = []
        for k in range(config.num_perturbations):
            ls = []
            for sign in (1.0, -1.0):
                ws.perturb(seed, 0, k, config.distribution, sign * config.eps)
                ls.append(float(runner.run(f"block_{i}", moved)["loss"].mean()))
            d = (ls[0] - ls[1]) / (2 * config.eps)
            if math.isfinite(d):
                pairs.append((k, d))
        grads = reconstruct_layer_gradient(specs, pairs, round_seed=seed, distribution=config.distribution)
        forwards = 1 + 2 * config.num_perturbations
    new_state = {n: out[f"new.{n}"] for n in snames}
    params = {n: trainables[n] for n in names}
    if math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values()):
        params, opt = optimizer_update(params, grads, opt, config.lr, config.optimizer)
    return BlockStep(params, new_state, loss, out["h"], forwards), opt


@dataclass(frozen=True)
class SFFTrainResult:
    trainables: dict[str, Array]
    state: dict[str, Array]
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def train_sff(bundle: Bundle, x: Array, labels: IntArray, config: SFFTrainConfig, *,
              trainables: Mapping[str, Array] | None = None, state: Mapping[str, Array] | None = None,
              runner: CNNRunner | None = None,
              on_epoch: Callable[[int, dict[str, Array], dict[str, Array]], dict[str, float]] | None = None,
              ) -> SFFTrainResult:
    """Train every block on every minibatch (block ``i`` on block ``i-1``'s output), ``config.epochs``
    passes over ``(x, labels)`` in a seeded order; the last partial batch is dropped (batch norm).
    ``on_epoch(epoch, trainables, state)`` may return metrics recorded in ``history``."""
    runner = runner or CNNRunner(bundle)
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels, np.int64)
    runner.check_data(x, labels)
    if len(x) < config.batch_size:
        raise DataError(f"{len(x)} training images are fewer than SFFTrainConfig.batch_size ({config.batch_size})")
    values = {k: np.array(v, np.float32) for k, v in (trainables or bundle.load_trainables()).items()}
    stats = {k: np.array(v, np.float32) for k, v in (state or load_state(bundle)).items()}
    opts = [AdamState() for _ in range(runner.num_blocks)]
    start = time.perf_counter()
    losses = np.zeros(runner.num_blocks)
    steps = forwards = 0
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(x))
        losses[:] = 0.0
        n_batches = len(x) // config.batch_size
        for b in range(n_batches):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            h, yb = x[idx], labels[idx]
            for i in range(runner.num_blocks):
                r, opts[i] = block_step(runner, i, values, stats, h, yb, config, opts[i], step=steps)
                values.update(r.params)
                stats.update(r.state)
                losses[i] += r.loss / n_batches
                forwards += r.forwards
                h = r.h
            steps += 1
        row = {"epoch": float(epoch + 1), **{f"loss_block_{i}": float(v) for i, v in enumerate(losses)}}
        if on_epoch is not None:
            row.update(on_epoch(epoch, values, stats))
        history.append(row)
    metrics = {"steps": float(steps), "block_graph_runs": float(forwards), "seconds": time.perf_counter() - start,
               **{f"final_loss_block_{i}": float(v) for i, v in enumerate(losses)}}
    return SFFTrainResult(values, stats, metrics, history)


def predict(runner: CNNRunner, trainables: Mapping[str, Array], state: Mapping[str, Array], x: Array,
            batch_size: int = 256) -> tuple[Array, Array]:
    """Graph ``model``'s (logits, logits_last) on ``x``: the heads' summed class goodness, the last head's."""
    x = np.asarray(x, np.float32)
    runner.check_data(x)
    spec = runner.graph("model")
    fixed = {t.name: (trainables[t.name] if t.name in trainables else state[t.name]) for t in spec.inputs
             if t.name not in ("x", "labels")}
    outs: list[tuple[Array, Array]] = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        r = runner.run("model", {"x": xb, "labels": np.zeros(len(xb), np.int64), **fixed})
        outs.append((r["logits"], r["logits_last"]))
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def evaluate_sff(runner: CNNRunner, trainables: Mapping[str, Array], state: Mapping[str, Array], x: Array,
                 labels: IntArray) -> dict[str, float]:
    """Accuracy predicting by the sum of the heads (``acc_sum``) and by the last head (``acc_last``)."""
    logits, last = predict(runner, trainables, state, x)
    labels = np.asarray(labels)
    return {"acc_sum": float((logits.argmax(1) == labels).mean()), "acc_last": float((last.argmax(1) == labels).mean())}
