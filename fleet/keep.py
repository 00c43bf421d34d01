"""Keep the trained model of a run: ``final/`` (the last evaluated model) and ``best/`` (by a metric).

Every evaluation of the global model is offered to a :class:`ModelKeeper`; it holds copies of the
trainables of the latest and of the best evaluation and, when the run ends (also when it is
interrupted), writes each as a verified bundle: the run's initial bundle with the trained
trainables (:meth:`fwdfleet.bundle.Bundle.save_as`). ``fwdfleet bundle eval`` on such a bundle
with the run's test data gives the figures the run reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.train import Evaluation

# what can choose best/: higher is better for each but the loss
BEST_METRICS = ("accuracy", "macro_f1", "loss")


def metric_value(evaluation: Evaluation, metric: str) -> float:
    """``metric`` of ``evaluation`` (NaN when the evaluation lacks it)."""
    if metric not in BEST_METRICS:
        raise ValueError(f"the metric choosing best/ must be one of {BEST_METRICS}, got {metric!r}")
    return float(getattr(evaluation, metric))


def _better(metric: str, new: float, old: float) -> bool:
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new < old if metric == "loss" else new > old


@dataclass
class KeptModel:
    version: int
    trainables: dict[str, np.ndarray]
    evaluation: Evaluation


class ModelKeeper:
    """The latest and the best evaluated model of a run, written out as bundles at the end."""

    def __init__(self, bundle: Bundle, out_dir: str | Path, metric: str = "accuracy") -> None:
        metric_value(Evaluation(0, math.nan, math.nan, 0), metric)  # refuses an unknown metric now
        self.bundle, self.out_dir, self.metric = bundle, Path(out_dir), metric
        self.final: KeptModel | None = None
        self.best: KeptModel | None = None

    def offer(self, version: int, trainables: Mapping[str, np.ndarray], evaluation: Evaluation) -> None:
        kept = KeptModel(version, {k: np.array(v, copy=True) for k, v in trainables.items()}, evaluation)
        if self.final is None or version >= self.final.version:
            self.final = kept
        new = metric_value(evaluation, self.metric)
        if self.best is None or _better(self.metric, new, metric_value(self.best.evaluation, self.metric)):
            self.best = kept

    def write(self) -> dict[str, Any]:
        """Write ``final/`` and ``best/``; what was written, for the run's summary."""
        out: dict[str, Any] = {}
        for name, kept in (("final", self.final), ("best", self.best)):
            if kept is None:
                continue
            full = dict(self.bundle.load_trainables())
            full.update(kept.trainables)
            path = self.bundle.save_as(self.out_dir / name, full).path
            out[name] = {"bundle": str(path), "model_version": kept.version,
                         "accuracy": kept.evaluation.accuracy, "macro_f1": kept.evaluation.macro_f1,
                         "loss": kept.evaluation.loss}
        if out:
            out["best_metric"] = self.metric
        return out
