"""Classification metrics from a confusion matrix: accuracy, macro-F1, per-class precision and recall.

Computed with numpy so that a base install (a phone, ``fwdfleet bundle eval``) has them; the
definitions are scikit-learn's (``accuracy_score``, ``f1_score(average="macro")``,
``precision_recall_fscore_support`` with ``zero_division=0``; macro-F1 averages over the classes
that occur in the labels or the predictions), and ``tests/test_metrics.py`` checks the figures
against scikit-learn's on random data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


def confusion_matrix(labels: npt.ArrayLike, predictions: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """``m[i, j]``: examples of true class ``i`` predicted as ``j`` (scikit-learn's layout)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(predictions, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= num_classes):
        raise ValueError(f"labels and predictions must be in 0..{num_classes - 1}")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: npt.NDArray[np.int64], den: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True)
class Classification:
    """What a confusion matrix says, per class and overall."""

    confusion: tuple[tuple[int, ...], ...]

    @classmethod
    def from_predictions(cls, labels: npt.ArrayLike, predictions: npt.ArrayLike, num_classes: int) -> Classification:
        m = confusion_matrix(labels, predictions, num_classes)
        return cls(tuple(tuple(int(v) for v in row) for row in m))

    @property
    def matrix(self) -> npt.NDArray[np.int64]:
        return np.asarray(self.confusion, dtype=np.int64).reshape(len(self.confusion), -1)

    @property
    def examples(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        m = self.matrix
        return float(np.trace(m) / m.sum()) if m.sum() else float("nan")

    @property
    def support(self) -> npt.NDArray[np.int64]:
        return np.asarray(self.matrix.sum(axis=1), dtype=np.int64)

    @property
    def precision(self) -> npt.NDArray[np.float64]:
        m = self.matrix
        return _ratio(np.diag(m), m.sum(axis=0))

    @property
    def recall(self) -> npt.NDArray[np.float64]:
        m = self.matrix
        return _ratio(np.diag(m), m.sum(axis=1))

    @property
    def f1(self) -> npt.NDArray[np.float64]:
        m = self.matrix
        return _ratio(2 * np.diag(m), m.sum(axis=0) + m.sum(axis=1))

    @property
    def macro_f1(self) -> float:
        m = self.matrix
        present = (m.sum(axis=0) + m.sum(axis=1)) > 0
        return float(self.f1[present].mean()) if present.any() else float("nan")

    def to_json(self, label_names: Sequence[str] = ()) -> dict[str, Any]:
        """Overall figures, one entry per class (named by ``label_names`` when given) and the matrix."""
        names = list(label_names) if len(label_names) == len(self.confusion) else [str(i) for i in
                                                                                   range(len(self.confusion))]
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "examples": self.examples,
            "per_class": {
                n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for n, p, r, f, s in zip(names, self.precision, self.recall, self.f1, self.support)
            },
            "confusion_matrix": [list(row) for row in self.confusion],
        }

    def format(self, label_names: Sequence[str] = ()) -> str:
        """A plain-text table: per-class precision/recall/F1/support, then the confusion matrix."""
        names = list(label_names) if len(label_names) == len(self.confusion) else [str(i) for i in
                                                                                   range(len(self.confusion))]
        w = max(8, *(len(n) for n in names)) if names else 8
        lines = [f"accuracy {100 * self.accuracy:.2f}%   macro-F1 {100 * self.macro_f1:.2f}%   "
                 f"({self.examples:,} examples)",
                 f"{'class':<{w}} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}"]
        for n, p, r, f, s in zip(names, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{n:<{w}} {100 * p:8.1f}% {100 * r:6.1f}% {100 * f:6.1f}% {int(s):8,}")
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        cw = max(6, *(len(str(v)) + 1 for row in self.confusion for v in row))
        lines.append(f"{'':<{w}} " + "".join(f"{n[:cw - 1]:>{cw}}" for n in names))
        for n, row in zip(names, self.confusion):
            lines.append(f"{n:<{w}} " + "".join(f"{v:>{cw}}" for v in row))
        return "\n".join(lines)
