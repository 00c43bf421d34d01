"""A fleet run saves its trained model: final/ and best/ are verified bundles that `bundle eval` scores
with the run's own figures; `bundle predict` writes one prediction a row; an interrupted run keeps
what it trained and says so."""

from __future__ import annotations

import csv
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.cli.main import main
from fwdfleet.fleet import run as fleet_run
from fwdfleet.fleet.config import load_fleet_config
from fwdfleet.fleet.datasets import load_split
from fwdfleet.fleet.emulate import RoundRecord


def _config(out: Path, *extra: str) -> Any:
    return load_fleet_config(None, [
        f'fleet.out_dir="{out}"', "fleet.devices=8", "fleet.rounds=6", "fleet.eval_every=2",
        "fleet.measure_memory=false", "partition.scheme=\"iid\"", "aggregator.rounds.min_devices=4",
        "aggregator.rounds.min_results=3", "aggregator.rounds.fraction=0.6", "aggregator.perturbation.k=8",
        "aggregator.optimizer.lr=0.5", *extra,
    ])


def _test_file(cfg: Any, path: Path) -> Path:
    test = load_split(cfg.dataset).test
    assert test.features is not None and test.labels is not None
    np.savez(path, x=test.features, labels=test.labels)
    return path


def test_final_bundle_scores_what_the_run_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path / "run")
    summary = fleet_run.run_fleet(cfg, progress=False, log=lambda _m: None)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_bundle"] == summary.final_bundle == str(tmp_path / "run" / "final")
    assert on_disk["best_bundle"] == str(tmp_path / "run" / "best") and on_disk["best_metric"] == "accuracy"
    final = load_bundle(summary.final_bundle, verify=True)
    initial = load_bundle(summary.initial_bundle, verify=True)
    w0 = "layers.0.weight"
    assert not np.allclose(final.load_trainables()[w0], initial.load_trainables()[w0])  # trained, not initial
    assert summary.final_accuracy is not None and summary.final_accuracy > summary.initial_accuracy + 0.1

    data = _test_file(cfg, tmp_path / "test.npz")
    capsys.readouterr()
    assert main(["bundle", "eval", summary.final_bundle, "--data", str(data), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(summary.final_accuracy, abs=1e-12)
    assert ev["macro_f1"] == pytest.approx(summary.final_macro_f1, abs=1e-12)
    assert summary.final_metrics is not None
    assert ev["confusion_matrix"] == summary.final_metrics["confusion_matrix"]
    assert sum(map(sum, ev["confusion_matrix"])) == ev["examples"]

    assert main(["bundle", "eval", str(summary.best_bundle), "--data", str(data), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["accuracy"] >= ev["accuracy"]  # best by accuracy over the evaluated rounds, the last among them
    assert main(["bundle", "eval", summary.final_bundle, "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "macro-F1" in text and "confusion matrix" in text

    preds = tmp_path / "preds.csv"
    assert main(["bundle", "predict", summary.final_bundle, "--data", str(data), "--out", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == ev["examples"]
    assert np.mean([r["predicted"] == r["label"] for r in rows]) == pytest.approx(ev["accuracy"])
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)


def test_best_metric_is_checked(tmp_path: Path) -> None:
    from fwdfleet.errors import ConfigError

    with pytest.raises(ConfigError, match="best_metric must be one of"):
        _config(tmp_path, 'fleet.best_metric="f1"')


def test_an_interrupted_run_keeps_its_last_model_and_a_summary(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = fleet_run.emulate

    def interrupted(*args: Any, **kwargs: Any) -> Generator[RoundRecord, None, None]:
        for rec in real(*args, **kwargs):
            yield rec
            if rec.model_version == 4:
                raise KeyboardInterrupt  # Ctrl-C after round 4

    monkeypatch.setattr(fleet_run, "emulate", interrupted)
    summary = fleet_run.run_fleet(_config(tmp_path / "run"), progress=False, log=lambda _m: None)
    assert summary.interrupted and summary.rounds == 4
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["interrupted"] is True and on_disk["final_bundle"] == str(tmp_path / "run" / "final")
    assert load_bundle(tmp_path / "run" / "final", verify=True).manifest.kind == "mlp"


def test_text_labels_become_the_bundles_label_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    spam = x[:, 0] + 0.3 * x[:, 1] > 0.8
    path = tmp_path / "mail.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "a", "b", "c", "d"])
        for row, s in zip(x, spam):
            w.writerow(["spam" if s else "ham", *(f"{v:.4f}" for v in row)])
    cfg = _config(tmp_path / "run", 'dataset.name="file"', f'dataset.path="{path}"')
    summary = fleet_run.run_fleet(cfg, progress=False, log=lambda _m: None)
    assert summary.final_bundle is not None
    assert load_bundle(summary.final_bundle).manifest.labels == ("ham", "spam")
    assert summary.final_metrics is not None and set(summary.final_metrics["per_class"]) == {"ham", "spam"}
    capsys.readouterr()
    assert main(["bundle", "eval", summary.final_bundle, "--data", str(path), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["per_class"]) == {"ham", "spam"}


def test_device_train_reports_the_metrics_on_all_held_out_examples(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

    cfg = _config(tmp_path)
    bundle = export_mlp(MLPConfig(layer_sizes=(64, 16, 10)), tmp_path / "mlp")
    data = _test_file(cfg, tmp_path / "digits.npz")  # 359 examples: more than a batch, all evaluated
    assert main(["device", "train", str(bundle), "--data", str(data), "--steps", "3", "--eval-fraction", "0.5",
                 "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    last = out["evaluations"][-1]
    assert last["examples"] == 180 == sum(map(sum, last["confusion_matrix"]))
    assert 0.0 <= last["macro_f1"] <= 1.0 and set(last["per_class"]) == {str(i) for i in range(10)}
    with pytest.raises(SystemExit):
        main(["device", "train", "--help"])
    assert "(default: 0)" in capsys.readouterr().out  # --eval-examples 0 = all, shown by --help
