"""Local training without a server: perturbed-inference SGD on sklearn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.data import ArrayDataset
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import LocalTrainConfig, derive_seed, evaluate, train_local
from fwdfleet.fleet.datasets import DIGITS_FILE


@pytest.fixture(scope="module")
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    with np.load(DIGITS_FILE, allow_pickle=False) as d:  # scikit-learn's digits, shipped with fleet
        ds = ArrayDataset({"x": (d["images"] / 16.0).astype(np.float32), "labels": d["labels"].astype(np.int64)})
    return ds.split(0.25, seed=0)


def test_training_on_digits_lowers_the_loss_and_beats_chance(digits, tmp_path: Path) -> None:
    train, ev = digits
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=64, num_classes=10)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    config = LocalTrainConfig(steps=300, num_perturbations=8, lr=0.3, batch_size=32, eval_every=100)
    report = train_local(session, train, config, eval_data=ev, out=tmp_path / "trained", progress=False)
    first, last = report.evaluations[0], report.evaluations[-1]
    assert [e.step for e in report.evaluations] == [0, 100, 200, 300]
    assert last.loss < 0.5 * first.loss
    assert last.accuracy > 0.7  # chance is 0.1; measured ~0.86
    assert report.skipped_perturbations == 0 and report.steps_done == 300

    saved = load_bundle(report.saved_to)  # verified checksums
    trained = saved.load_trainables()
    assert not np.allclose(trained["layers.0.weight"], bundle.load_trainables()["layers.0.weight"])
    again = evaluate(BundleSession(saved), trained, ev.batches(64), step=300)
    assert again.accuracy == pytest.approx(last.accuracy)


def test_training_is_reproducible(digits, tmp_path: Path) -> None:
    train, ev = digits
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=64, num_classes=10)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    config = LocalTrainConfig(steps=20, num_perturbations=4, lr=0.1, batch_size=16, eval_every=0, seed=5)
    a = train_local(session, train, config, eval_data=ev, progress=False)
    b = train_local(session, train, config, eval_data=ev, progress=False)
    np.testing.assert_array_equal(a.trainables["layers.0.weight"], b.trainables["layers.0.weight"])
    c = train_local(session, train, LocalTrainConfig(**{**vars(config), "seed": 6}), eval_data=ev, progress=False)
    assert not np.array_equal(a.trainables["layers.0.weight"], c.trainables["layers.0.weight"])


def test_sampling_and_forward_difference_also_train(digits, tmp_path: Path) -> None:
    train, ev = digits
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=64, num_classes=10)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    for extra in ({"candidate_ratio": 4}, {"difference": "forward", "eps": 1e-3}):
        config = LocalTrainConfig(steps=60, num_perturbations=8, lr=0.3, batch_size=32, eval_every=0, **extra)
        report = train_local(session, train, config, eval_data=ev, progress=False)
        assert report.evaluations[-1].loss < report.evaluations[0].loss, extra


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("num_perturbations", 0),
        ("lr", -1.0),
        ("eps", float("nan")),
        ("schedule", "step"),
        ("difference", "backward"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LocalTrainConfig.{field}"):
        LocalTrainConfig(**{field: value})  # type: ignore[arg-type]


def test_cosine_schedule_and_seeds() -> None:
    c = LocalTrainConfig(steps=10, lr=1.0, schedule="cosine")
    assert c.lr_at(0) == pytest.approx(1.0) and c.lr_at(10) == pytest.approx(0.0)
    assert len({derive_seed(0, s) for s in range(1000)}) == 1000
    # splitmix64: with seed 0, step n * golden - 1 puts the state at n * golden (mod 2**64), where the
    # reference generator's n-th output is known
    golden = 0x9E3779B97F4A7C15
    assert [derive_seed(0, (n * golden - 1) % 2**64) for n in (1, 2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
