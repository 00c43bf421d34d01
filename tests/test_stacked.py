"""Stacked graphs: several perturbed points per onnxruntime call give the estimator's plain results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from _export_fixtures import tiny_bert_folder

from fwdfleet.bundle import load_bundle
from fwdfleet.cli.main import main
from fwdfleet.device_runtime.data import synthetic_batch
from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.errors import DataError, ExportError
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp
from fwdfleet.export.seq_cls import SeqClsExport, export_seq_cls
from fwdfleet.export.stack import STACKED_GRAPH, StackSettings, add_stacked_graph
from fwdfleet.task import RoundTask


def _task(**kw: object) -> RoundTask:
    base: dict[str, object] = {"round_id": 1, "model_version": 0, "round_seed": 0xBEEF, "device_index": 3,
                               "num_perturbations": 4, "eps": 1e-2}  # fmt: skip
    return RoundTask(**{**base, **kw})  # type: ignore[arg-type]


def _same_results(plain: BundleSession, stacked: BundleSession, batch: dict, task: RoundTask, calls: int) -> None:
    trainables = plain.bundle.load_trainables()
    a = estimate(plain, trainables, batch, task)
    b = estimate(stacked, trainables, batch, task)
    assert a.indices == b.indices and not b.skipped
    np.testing.assert_allclose(b.derivatives, a.derivatives, rtol=2e-3, atol=2e-4)
    assert b.loss_mean == pytest.approx(a.loss_mean, rel=1e-5)
    assert b.extras["passes"] == a.extras["passes"]
    assert b.extras["session_calls"] == calls < a.extras["session_calls"]


def test_mlp_stacked_graph_gives_the_plain_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_mlp(MLPConfig(layer_sizes=(12, 16, 4), seed=1), tmp_path / "mlp")
    spec = add_stacked_graph(path, StackSettings(points=3, batch_size=8))
    bundle = load_bundle(path)  # checksums of the new graph verified
    assert bundle.manifest.graph(STACKED_GRAPH) == spec
    assert spec.inputs[-1].shape == (3, 4) and spec.outputs[0].shape == (3, 8)
    opts = SessionOptions(intra_op_threads=1)
    plain, stacked = BundleSession(bundle, opts), BundleSession(bundle, opts, graph=STACKED_GRAPH)
    assert (plain.stack, stacked.stack) == (1, 3)
    batch = synthetic_batch(bundle, 8)
    _same_results(plain, stacked, batch, _task(), calls=3)  # 8 points: 3 + 3 + a partial 2
    _same_results(plain, stacked, batch, _task(difference="forward", num_perturbations=5), calls=2)  # 6 points
    with pytest.raises(DataError, match="axis 0 must be 8"):
        estimate(stacked, bundle.load_trainables(), synthetic_batch(bundle, 5), _task())

    # the NPU benchmark and the memory probe time/measure training steps on the stacked graph
    code = main(["device", "bench", str(path), "--train-graph", STACKED_GRAPH, "--batch-size", "8", "--count", "2",
                 "--train-count", "1", "--warmup", "1", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report[0]["train_step"]["p50_ms"] > 0, report


def test_lora_classifier_stacked_graph_gives_the_plain_estimates(tmp_path: Path) -> None:
    folder = tiny_bert_folder(tmp_path / "bert")
    cfg = SeqClsExport(source=folder, labels=("a", "b", "c"), lora=LoraSettings(rank=4, alpha=8), max_length=16)
    bundle = export_seq_cls(cfg, tmp_path / "lora").bundle
    with pytest.raises(ExportError, match="sequence-length"):
        add_stacked_graph(bundle.path, StackSettings(points=4, batch_size=2))
    code = main(["export", "stack", str(bundle.path), "-p", "4", "--batch-size", "2", "--sequence-length", "16"])
    assert code == 0
    bundle = load_bundle(bundle.path)
    opts = SessionOptions(intra_op_threads=1)
    plain, stacked = BundleSession(bundle, opts), BundleSession(bundle, opts, graph=STACKED_GRAPH)
    batch = synthetic_batch(bundle, 2, sequence_length=16)
    _same_results(plain, stacked, batch, _task(num_perturbations=3), calls=2)  # 6 points: 4 + a partial 2


def test_stack_settings_are_validated() -> None:
    with pytest.raises(ExportError, match="points must be >= 2"):
        StackSettings(points=1, batch_size=4)
    with pytest.raises(ExportError, match="batch_size"):
        StackSettings(points=2, batch_size=0)


def test_local_training_on_a_stacked_graph_matches_the_plain_graph(tmp_path: Path) -> None:
    from sklearn import datasets

    from fwdfleet.device_runtime.data import ArrayDataset
    from fwdfleet.device_runtime.train import LocalTrainConfig, train_local

    d = datasets.load_digits()
    data = ArrayDataset({"x": (d.data / 16.0).astype(np.float32), "labels": d.target.astype(np.int64)})
    train, ev = data.split(0.25, seed=0)
    path = export_mlp(MLPConfig(layer_sizes=(64, 16, 10), seed=2), tmp_path / "mlp")
    add_stacked_graph(path, StackSettings(points=4, batch_size=32))
    bundle = load_bundle(path)
    opts = SessionOptions(intra_op_threads=1)
    session, stacked = BundleSession(bundle, opts), BundleSession(bundle, opts, graph=STACKED_GRAPH)
    config = LocalTrainConfig(steps=80, num_perturbations=4, lr=0.05, batch_size=32, eval_every=0)
    plain = train_local(session, train, config, eval_data=ev, progress=False)
    together = train_local(session, train, config, eval_data=ev, progress=False, trainer=stacked)
    a, b = plain.evaluations[-1], together.evaluations[-1]
    assert b.loss < 0.8 * together.evaluations[0].loss  # it learns
    assert b.loss == pytest.approx(a.loss, rel=1e-3) and abs(b.accuracy - a.accuracy) <= 0.01
