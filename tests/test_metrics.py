"""Classification metrics (numpy, base install) agree with scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.device_runtime.metrics import Classification, confusion_matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n_classes = 5
    y = rng.integers(0, n_classes, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, n_classes - 1, 300))  # class 4 rarely predicted
    c = Classification.from_predictions(y, p, n_classes)
    assert c.accuracy == pytest.approx(metrics.accuracy_score(y, p))
    assert c.macro_f1 == pytest.approx(metrics.f1_score(y, p, average="macro", zero_division=0))
    prec, rec, f1, support = metrics.precision_recall_fscore_support(y, p, labels=range(n_classes), zero_division=0)
    np.testing.assert_allclose(c.precision, prec)
    np.testing.assert_allclose(c.recall, rec)
    np.testing.assert_allclose(c.f1, f1)
    np.testing.assert_array_equal(c.support, support)
    np.testing.assert_array_equal(c.matrix, metrics.confusion_matrix(y, p, labels=range(n_classes)))


def test_macro_f1_averages_the_classes_that_occur() -> None:
    # class 2 neither occurs nor is predicted: scikit-learn leaves it out of the macro average
    c = Classification.from_predictions([0, 0, 1, 1], [0, 1, 1, 1], 3)
    f1_0, f1_1 = 2 * 1 / (2 * 1 + 1), 2 * 2 / (2 * 2 + 1)
    assert c.macro_f1 == pytest.approx((f1_0 + f1_1) / 2)
    assert c.accuracy == 0.75
    # a majority-class model: high accuracy, low macro-F1 (what accuracy hides with 12% positives)
    y = np.array([0] * 88 + [1] * 12)
    m = Classification.from_predictions(y, np.zeros(100, dtype=int), 2)
    assert m.accuracy == 0.88 and m.macro_f1 == pytest.approx(0.5 * 2 * 88 / (88 + 100))
    assert m.recall[1] == 0.0 and m.precision[1] == 0.0


def test_confusion_matrix_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="labels but"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_report_names_the_classes() -> None:
    c = Classification.from_predictions([0, 1, 1], [0, 1, 0], 2)
    js = c.to_json(("ham", "spam"))
    assert js["per_class"]["spam"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert js["confusion_matrix"] == [[1, 0], [1, 1]]
    text = c.format(("ham", "spam"))
    assert "spam" in text and "macro-F1" in text
