"""Short versions of the FwdLLM experiments (benchmarks/fwdllm_agnews.py, causal_lm_zo.py) asserting
that learning happens: a forward-only head initialisation far above chance, scalar-upload rounds
under 1 KB per device that lower the loss, FedAvg-backprop learning, a causal LM's held-out loss
going down. Real exports, real onnxruntime sessions, the real Coordinator."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _export_fixtures import minilm_folder
from _prereqs import ag_news

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.baselines import fedavg_backprop, linear_probe  # noqa: E402
from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, PacingConfig, PerturbationConfig, RoundsConfig  # noqa: E402
from fwdfleet.bundle import Bundle, load_bundle  # noqa: E402
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle  # noqa: E402
from fwdfleet.device_runtime.session import BundleSession, SessionOptions  # noqa: E402
from fwdfleet.fleet.datasets import DatasetConfig, load_split  # noqa: E402
from fwdfleet.fleet.emulate import EmulationSettings, Evaluator, emulate  # noqa: E402
from fwdfleet.fleet.partition import PartitionConfig, partition  # noqa: E402
from fwdfleet.fleet.probe_init import (  # noqa: E402
    ClassStats,
    centroid_head,
    class_stats,
    extract_features,
    probe_init,
    stats_wire_bytes,
)
from fwdfleet.fleet.profiles import PRESETS  # noqa: E402

# ------------------------------------------------------------------------------ probe_init alone


def _blobs(n: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return centres[y] + 0.7 * rng.normal(size=(n, dim)).astype(np.float32), y.astype(np.int64)


def test_probe_init_fits_a_head_from_class_means_and_counts_its_bytes() -> None:
    x_all, y_all = _blobs(1200, 4, 16, 0)
    x, y, xt, yt = x_all[:900], y_all[:900], x_all[900:], y_all[900:]
    shards = partition(y, PartitionConfig(scheme="dirichlet", num_devices=12, alpha=0.3, seed=0))
    init = probe_init([(x[s], y[s]) for s in shards], 4)
    acc = float(((xt @ init.weight.T + init.bias).argmax(1) == yt).mean())
    assert acc > 0.9
    assert init.scale in init.scale_losses and init.scale_losses[init.scale] == min(init.scale_losses.values())
    present = [int((np.bincount(y[s], minlength=4) > 0).sum()) for s in shards]
    assert init.stats_bytes == [16 + p * (1 + 4 + 2 * 16) for p in present]
    assert all(b == 16 + 4 * 6 + 4 for b in init.scale_bytes)


def test_centroid_head_is_the_nearest_centroid_rule() -> None:
    x, y = _blobs(400, 3, 8, 2)
    w, b = centroid_head([class_stats(x, y, 3)])
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    nearest = ((x[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    assert ((x @ w.T + b).argmax(1) == nearest).mean() > 0.99  # float16 means: ties may flip


def test_probe_init_rejects_missing_classes_and_bad_uploads() -> None:
    x, y = _blobs(50, 2, 4, 3)
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        probe_init([(x, y)], 3)
    with pytest.raises(ValueError, match="finite"):
        ClassStats(counts=np.array([1, 1]), means=np.full((2, 4), np.nan, dtype=np.float16))
    assert stats_wire_bytes(class_stats(x[y == 0], y[y == 0], 2)) == 16 + 1 * (1 + 4 + 8)


# --------------------------------------------------------------- the FwdLLM pipeline, shrunk


@pytest.fixture(scope="module")
def tiny_cls_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    import shutil

    from transformers import AutoModel

    from fwdfleet.export.seq_cls import SeqClsExport, export_seq_cls

    base = tmp_path_factory.mktemp("fwdllm-smoke")
    # the pretrained MiniLM cut to its first layer: pretrained features at a sixth of the cost
    folder = base / "minilm-1layer"
    model = AutoModel.from_pretrained(minilm_folder(), local_files_only=True)
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    export_seq_cls(SeqClsExport(source=folder, labels=("World", "Sports", "Business", "Sci/Tech"), max_length=32,
                                verify=False), base / "bundle")
    return load_bundle(base / "bundle")


def test_forward_only_head_init_then_scalar_rounds_learn(tiny_cls_bundle: Bundle, tmp_path: Path) -> None:
    bundle = tiny_cls_bundle
    split = load_split(DatasetConfig(name="ag-news", path=str(ag_news()), test_fraction=0.2, max_train=320,
                                     max_test=120))
    train, test = split.train, split.test
    assert train.labels is not None and test.labels is not None
    shards = partition(train.labels, PartitionConfig(scheme="dirichlet", num_devices=8, alpha=0.5, min_samples=8))
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    start = bundle.load_trainables()
    data = dataset_for_bundle(train, bundle)
    per_device = [extract_features(session, start, [data.take(s)]) for s in shards]
    init = probe_init(per_device, 4)
    xt, yt = extract_features(session, start, dataset_for_bundle(test, bundle).batches(60))
    init_acc = float(((xt @ init.weight.T + init.bias).argmax(1) == yt).mean())
    assert init_acc > 0.6, init_acc  # chance is 0.25
    x_all = np.concatenate([f for f, _ in per_device])
    y_all = np.concatenate([lab for _, lab in per_device])
    assert linear_probe(x_all, y_all, xt, yt) > 0.6
    assert 0 < init.bytes_per_device < 16 + 4 * (1 + 4 + 2 * 384) + 44 + 1  # hidden 384, at most 4 classes

    init_bundle = bundle.save_as(tmp_path / "init", init.trainables(start))
    evaluator = Evaluator(init_bundle, test, 60)
    loss0, acc0 = evaluator(init_bundle.load_trainables())
    assert acc0 == pytest.approx(init_acc, abs=0.02)
    cfg = AggregatorConfig(
        rounds=RoundsConfig(fraction=0.375, min_devices=3, batch_size=16, deadline_s=60.0),
        perturbation=PerturbationConfig(k=3, eps=1e-2, candidate_ratio=4),
        optimizer=OptimizerConfig(name="sgd", lr=0.05),
        pacing=PacingConfig(enabled=True, threshold=0.5, max_extra_requests=1, k_max=8),
    )
    records = list(emulate(init_bundle, cfg, train, shards, [PRESETS["desktop"]] * 8,
                           EmulationSettings(rounds=5, eval_every=5, eval_batch=60), test=test))
    assert len(records) == 5
    assert all(0 < r.bytes_up_per_device < 1024 for r in records)
    final = records[-1]
    assert final.loss is not None and final.accuracy is not None
    # Five scalar rounds barely move a 75k-value LoRA+head (the lr window is narrow: 0.5 diverges here);
    # the smoke checks they stay stable; the learning is the forward-only head (0.25 -> > 0.6) and
    # the causal-LM test below, where scalar rounds do lower the held-out loss.
    assert final.loss < loss0 + 0.02, (loss0, final.loss)
    assert final.accuracy > 0.6


def test_fedavg_backprop_learns_digits(tmp_path: Path) -> None:
    from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

    export_mlp(MLPConfig(layer_sizes=(64, 32, 10)), tmp_path / "mlp")
    bundle = load_bundle(tmp_path / "mlp")
    split = load_split(DatasetConfig(name="digits"))
    assert split.train.labels is not None
    shards = partition(split.train.labels, PartitionConfig(scheme="dirichlet", num_devices=10, alpha=0.5,
                                                           min_samples=5))
    seen = []
    run = fedavg_backprop(bundle, split.train, split.test, shards, rounds=6, local_steps=10, lr=1e-2,
                          devices_per_round=5, profiles=[PRESETS["desktop"]] * 10, on_round=seen.append)
    assert len(seen) == 6 and seen[-1].sim_time_s is not None and seen[-1].sim_time_s > 0
    assert run.final_accuracy is not None and run.final_accuracy > 0.6
    assert seen[-1].bytes_up_per_device == 4 * bundle.manifest.num_trainable
    with pytest.raises(ValueError, match="devices_per_round"):
        fedavg_backprop(bundle, split.train, None, shards, 1, 1, 1e-2, devices_per_round=11)


def test_causal_lm_held_out_loss_goes_down(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from benchmarks.causal_lm_zo import run

    out = run(data=ag_news(), work=tmp_path, rounds=10, devices=4, per_round=2, k=2, lr=1.0, train_texts=200,
              test_texts=40, tokenizer_texts=400, max_length=24, eval_every=10, vocab=200, hidden=32)
    assert out["final_loss"] < out["initial_loss"] - 0.005, out
    assert 0 < out["bytes_up_per_device_per_round"] < 1024


def test_raw_text_without_labels_is_rejected_by_probe_init(tiny_cls_bundle: Bundle) -> None:
    session = BundleSession(tiny_cls_bundle, SessionOptions(intra_op_threads=1))
    with pytest.raises(ValueError, match="no batches"):
        extract_features(session, tiny_cls_bundle.load_trainables(), [])
    raw = RawData(labels=np.array([0, 1], dtype=np.int64), texts=("a b", "c d"))
    x, y = extract_features(session, tiny_cls_bundle.load_trainables(),
                            dataset_for_bundle(raw, tiny_cls_bundle).batches(2))
    assert x.shape == (2, 384) and y.tolist() == [0, 1]
