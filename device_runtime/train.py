"""Local training without a server: perturbed-inference SGD on one device's data.

Each step draws a minibatch, estimates K directional derivatives with
:func:`device_runtime.estimator.estimate` and applies ``w -= lr * mean_k d_k z_k``,
regenerating every ``z_k`` from its seed into one reused buffer (the K vectors are never held
at once). Step ``s`` uses the round seed ``derive_seed(config.seed, s)``, so a run is
reproducible and, like a federated round, fully described by seeds and scalars.

Evaluation (mean loss; accuracy, macro-F1, per-class precision/recall and the confusion matrix
when the graph has logits and labels; :mod:`device_runtime.metrics`) runs every
``eval_every`` steps; progress goes through ``tqdm`` when it is installed, plain lines otherwise.
The trained tensors are saved back as a bundle with :meth:`fwdfleet.bundle.Bundle.save_as`.
Ctrl-C stops after the current step and still saves what was trained.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import ArrayDataset, Batch, TextDataset
from fwdfleet.device_runtime.estimator import EstimatorWorkspace, accumulate_update, estimate
from fwdfleet.device_runtime.metrics import Classification
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import ConfigError
from fwdfleet.perturbation import DISTRIBUTIONS, Distribution, split
from fwdfleet.task import DIFFERENCES, DeviceResult, Difference, RoundTask

Schedule = Literal["constant", "cosine"]
_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, step: int) -> int:
    """The round seed of local step ``step`` (splitmix64 of ``seed`` and ``step``)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class LocalTrainConfig:
    steps: int = 200
    num_perturbations: int = 4
    eps: float = 1e-2
    lr: float = 1e-2
    batch_size: int = 16
    seed: int = 0
    schedule: Schedule = "constant"
    distribution: Distribution = "rademacher"
    difference: Difference = "central"
    candidate_ratio: int = 1
    eval_every: int = 50
    eval_examples: int = 0  # 0: every evaluation example

    def __post_init__(self) -> None:
        if self.eval_examples < 0:
            raise ValueError(f"LocalTrainConfig.eval_examples must be >= 0 (0: all), got {self.eval_examples}")
        for name in ("steps", "num_perturbations", "batch_size", "candidate_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"LocalTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eps", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"LocalTrainConfig.{name} must be a positive finite number, got {value}")
        if self.eval_every < 0:
            raise ValueError("LocalTrainConfig.eval_every must be >= 0 (0: only at the start and the end)")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"LocalTrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"LocalTrainConfig.distribution must be one of {DISTRIBUTIONS}")
        if self.difference not in DIFFERENCES:
            raise ValueError(f"LocalTrainConfig.difference must be one of {DIFFERENCES}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError("LocalTrainConfig.seed must be an unsigned 64-bit integer")

    def lr_at(self, step: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr


@dataclass(frozen=True)
class Evaluation:
    step: int
    loss: float
    accuracy: float  # NaN when the graph has no logits/labels to score
    examples: int
    classification: Classification | None = None  # None when the graph has no logits/labels to score

    @property
    def macro_f1(self) -> float:
        return self.classification.macro_f1 if self.classification is not None else math.nan

    def to_json(self, label_names: Sequence[str] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "loss": self.loss, "accuracy": self.accuracy,
                               "examples": self.examples}
        if self.classification is not None:
            out.update(self.classification.to_json(label_names))
        return out


@dataclass
class TrainReport:
    trainables: dict[str, npt.NDArray[Any]]
    evaluations: list[Evaluation] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    skipped_perturbations: int = 0
    steps_done: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    saved_to: Path | None = None


def evaluate(
    session: BundleSession, trainables: Mapping[str, npt.NDArray[Any]], batches: Iterable[Batch], step: int = 0
) -> Evaluation:
    """Mean per-sample loss and (if the graph has ``logits`` and the batches ``labels``) accuracy,
    macro-F1, per-class precision/recall and the confusion matrix."""
    loss_sum, count = 0.0, 0
    labels: list[npt.NDArray[np.int64]] = []
    predicted: list[npt.NDArray[np.int64]] = []
    width = 0
    for batch, out in scored_batches(session, trainables, batches):
        loss = np.asarray(out["loss"], dtype=np.float64)
        loss_sum += float(loss.sum())
        count += len(loss)
        logits = out.get("logits")
        if logits is not None and "labels" in batch and logits.ndim == 2:
            width = logits.shape[1]
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
            predicted.append(logits.argmax(axis=1).astype(np.int64))
    cls = (Classification.from_predictions(np.concatenate(labels), np.concatenate(predicted), width)
           if labels else None)
    return Evaluation(
        step=step,
        loss=loss_sum / count if count else math.nan,
        accuracy=cls.accuracy if cls is not None else math.nan,
        examples=count,
        classification=cls,
    )


def scored_batches(session: BundleSession, trainables: Mapping[str, npt.NDArray[Any]],
                   batches: Iterable[Batch]) -> Iterator[tuple[Batch, dict[str, npt.NDArray[Any]]]]:
    """Each batch with the graph's ``loss`` (and ``logits`` when it has them) at ``trainables``."""
    outputs = ("loss", "logits") if "logits" in session.output_names else ("loss",)
    for batch in batches:
        yield batch, dict(session.run(trainables, batch, outputs))


def _progress(total: int, enabled: bool) -> tuple[Callable[[dict[str, str]], None], Callable[[str], None], Any]:
    """(update one step with a postfix, write a line, the bar to close or None)."""
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            return (lambda post: (bar.set_postfix(post, refresh=False), bar.update(1))[-1], bar.write, bar)
        except ImportError:
            pass
    return (lambda post: None), (lambda line: print(line, file=sys.stderr) if enabled else None), None


def local_step_task(config: LocalTrainConfig, step: int) -> RoundTask:
    """The task of local step ``step``: its own round seed and minibatch seed derived from ``config.seed``."""
    return RoundTask(
        round_id=step,
        model_version=step,
        round_seed=derive_seed(config.seed, step),
        device_index=0,
        num_perturbations=config.num_perturbations,
        eps=config.eps,
        distribution=config.distribution,
        difference=config.difference,
        candidate_ratio=config.candidate_ratio,
        batch_size=config.batch_size,
        data_seed=derive_seed(config.seed ^ 0x5EED, step),
    )


def sgd_step(trainer: BundleSession, current: Mapping[str, npt.NDArray[Any]], w: npt.NDArray[np.float32],
             batch: Batch, task: RoundTask, lr: float, ws: EstimatorWorkspace,
             guide: npt.NDArray[np.float32] | None = None, *,
             track: npt.NDArray[np.float32] | None = None) -> DeviceResult:
    """One perturbed-inference SGD step: estimate on ``batch``, then ``w -= lr * mean_k d_k z_k`` in place
    (``current`` are views of ``w``). ``track``, if given, receives the step's change of ``w``."""
    result = estimate(trainer, current, batch, task, guide, workspace=ws)
    if result.indices:
        if track is not None:
            track[:] = w
        accumulate_update(result, task, ws.n, scale=-lr / len(result.indices), out=w, buffer=ws.z)
        if track is not None:
            np.subtract(w, track, out=track)
    return result


def train_local(
    session: BundleSession,
    train_data: ArrayDataset | TextDataset,
    config: LocalTrainConfig,
    *,
    eval_data: ArrayDataset | TextDataset | None = None,
    trainables: Mapping[str, npt.NDArray[Any]] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    trainer: BundleSession | None = None,
) -> TrainReport:
    """Train the session's bundle on ``train_data``; save to ``out`` (a new bundle folder) if given.

    ``trainer`` runs the perturbed forwards (default ``session``), e.g. a session on the bundle's
    stacked graph (several points per call); ``session`` evaluates."""
    bundle: Bundle = session.bundle
    specs = session.trainable_specs
    trainer = trainer or session
    if trainer.bundle.path != bundle.path or trainer.trainable_specs != specs:
        raise ConfigError(f"the trainer session runs graph {trainer.graph.name!r} of another bundle or other "
                          "trainables; build it on the same bundle as the evaluating session")  # fmt: skip
    ws = EstimatorWorkspace(specs)
    w = np.empty(ws.n, dtype=np.float32)
    current = split(w, specs)
    initial = trainables if trainables is not None else bundle.load_trainables()
    for t in specs:
        np.copyto(current[t.name], initial[t.name], casting="unsafe")
    guide = np.zeros(ws.n, dtype=np.float32) if config.candidate_ratio > 1 else None
    have_guide = False
    report = TrainReport(trainables={})
    evaluator = eval_data if eval_data is not None else train_data

    def run_eval(step: int) -> Evaluation:
        batches = evaluator.batches(max(config.batch_size, 64), config.eval_examples or None)
        e = evaluate(session, current, batches, step)
        report.evaluations.append(e)
        return e

    step_fn, write, bar = _progress(config.steps, progress)
    start = time.perf_counter()
    e0 = run_eval(0)
    write(f"step 0: eval loss {e0.loss:.4f}  accuracy {e0.accuracy:.3f}")
    try:
        for step in range(config.steps):
            task = local_step_task(config, step)
            batch = train_data.batch(task.data_seed, config.batch_size)
            result = sgd_step(trainer, current, w, batch, task, config.lr_at(step), ws,
                              guide if have_guide else None, track=guide)
            have_guide = have_guide or (guide is not None and bool(result.indices))
            report.skipped_perturbations += len(result.skipped)
            report.train_losses.append(result.loss_mean)
            report.steps_done = step + 1
            step_fn({"loss": f"{result.loss_mean:.4f}", "skipped": str(report.skipped_perturbations)})
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                e = run_eval(step + 1)
                write(f"step {step + 1}: eval loss {e.loss:.4f}  accuracy {e.accuracy:.3f}")
    except KeyboardInterrupt:
        report.interrupted = True
        write(f"interrupted after {report.steps_done} steps; keeping what was trained")
    finally:
        if bar is not None:
            bar.close()
    e = run_eval(report.steps_done)
    write(f"step {report.steps_done}: eval loss {e.loss:.4f}  accuracy {e.accuracy:.3f}")
    report.seconds = time.perf_counter() - start
    report.trainables = {t.name: current[t.name].astype(t.dtype) for t in specs}
    if out is not None:
        full = dict(bundle.load_trainables())
        full.update(report.trainables)
        report.saved_to = bundle.save_as(out, full).path
    return report
