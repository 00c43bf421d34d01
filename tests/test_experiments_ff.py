"""Short versions of the FedFwd and BAFFLE experiments (benchmarks/fedfwd.py, benchmarks/baffle.py) on
scikit-learn's digits, asserting that learning happens: federated Forward-Forward through the real
Coordinator in fedavg mode, scalar-uplink training of the plain MLP bundle through the fleet emulation,
and the FedAvg-backprop baseline. Real bundles, real onnxruntime sessions, the real Coordinator."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdfleet.aggregator.config import AggregatorConfig  # noqa: E402
from fwdfleet.aggregator.coordinator import Coordinator  # noqa: E402
from fwdfleet.bundle import load_bundle  # noqa: E402
from fwdfleet.device_runtime.ff_train import FFTrainConfig  # noqa: E402
from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp  # noqa: E402
from fwdfleet.fleet.datasets import DatasetConfig, load_split  # noqa: E402
from fwdfleet.fleet.emulate import EmulationError  # noqa: E402
from fwdfleet.fleet.fedfwd import FedFwdSettings, fedavg_config, run_fedfwd, with_local_training  # noqa: E402
from fwdfleet.fleet.partition import PartitionConfig, partition  # noqa: E402
from fwdfleet.lr_schedule import round_lr  # noqa: E402
from fwdfleet.task import DeviceProfile, DeviceResult  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CHANCE = 0.1


@pytest.fixture(scope="module")
def digits():
    d = load_split(DatasetConfig(name="digits"))
    return d.train.features, d.train.labels, d.test.features, d.test.labels


@pytest.fixture(scope="module")
def pon_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ff") / "pon"
    return load_bundle(export_ff_mlp(FFMLPConfig(layers=(64, 64, 64), heads="softmax", seed=0), folder))


@pytest.mark.parametrize("scheme, floor", [("iid", 0.8), ("dirichlet", 0.5)])
def test_fedfwd_learns_digits(digits, pon_bundle, scheme, floor):
    x, y, xt, yt = digits
    shards = partition(y, PartitionConfig(scheme, 10, alpha=0.5, seed=0))
    run = run_fedfwd(pon_bundle, FFTrainConfig(objective="pon", epochs=2), x, y, shards,
                     FedFwdSettings(rounds=6, eval_every=2), test=(xt, yt))
    accs = [r.accuracy for r in run.records if r.accuracy is not None]
    assert [r.model_version for r in run.records] == list(range(1, 7))
    assert len(accs) == 3
    assert accs[-1] > floor, accs  # chance is 0.1
    rec = run.records[-1]
    assert rec.participants == 10
    dense = 4 * pon_bundle.manifest.num_trainable
    assert dense < rec.bytes_up_per_device < dense + 200  # the weights plus a short result message
    assert rec.train_loss is not None and run.records[0].train_loss is not None
    assert rec.train_loss < run.records[0].train_loss  # the devices' local FF loss went down
    # the returned trainables are the aggregator's global model, not the bundle's initial values
    assert not np.allclose(run.trainables["layers.0.weight"], pon_bundle.load_trainables()["layers.0.weight"])


def test_fedfwd_goodness_objective_and_perturbed_mode(digits, tmp_path):
    x, y, xt, yt = digits
    bundle = load_bundle(export_ff_mlp(FFMLPConfig(layers=(64, 32, 32), seed=1), tmp_path / "plain"))
    shards = partition(y, PartitionConfig("iid", 5, seed=0))
    sym = run_fedfwd(bundle, FFTrainConfig(objective="symmetric", epochs=2), x, y, shards,
                     FedFwdSettings(rounds=3, eval_every=0), test=(xt, yt))
    assert sym.records[-1].accuracy is not None and sym.records[-1].accuracy > 3 * CHANCE
    # perturbed inference of the layer graphs: a handful of zeroth-order steps still moves the model
    pert = run_fedfwd(bundle, FFTrainConfig(objective="symmetric", mode="perturbed", optimizer="sgd", lr=0.2,
                                            max_steps=3, num_perturbations=4), x, y, shards,
                      FedFwdSettings(rounds=2, eval_every=0), test=(xt, yt))
    assert pert.local_steps == [3] * 5
    assert not np.allclose(pert.trainables["layers.1.weight"], bundle.load_trainables()["layers.1.weight"])


def test_fedfwd_rejects_wrong_mode_and_drops_diverged_devices(digits, pon_bundle):
    x, y, _, _ = digits
    shards = partition(y, PartitionConfig("iid", 4, seed=0))
    with pytest.raises(ValueError, match="fedavg"):
        run_fedfwd(pon_bundle, FFTrainConfig(objective="pon"), x, y, shards, FedFwdSettings(rounds=1),
                   aggregator=AggregatorConfig(mode="scalar"))
    with pytest.raises(ValueError, match="rounds"):
        FedFwdSettings(rounds=0)
    # A validation bound every upload exceeds: no device is accepted, and the run says what to do.
    cfg = fedavg_config(4, 1)
    strict = AggregatorConfig(mode="fedavg", rounds=cfg.rounds, optimizer=cfg.optimizer,
                              validation=type(cfg.validation)(max_abs_value=1e-9))
    with pytest.raises(EmulationError, match=r"refused the upload.*max_abs_value"):
        run_fedfwd(pon_bundle, FFTrainConfig(objective="pon", max_steps=1), x, y, shards, FedFwdSettings(rounds=1),
                   aggregator=strict)


def test_round_lr_schedules_decay_from_lr_and_stay_positive():
    assert [round_lr(0.1, r, 4) for r in range(4)] == [0.1] * 4
    assert [round(round_lr(0.1, r, 4, "linear"), 6) for r in range(4)] == [0.1, 0.075, 0.05, 0.025]
    cos = [round_lr(0.1, r, 20, "cosine", 0.1) for r in range(20)]
    assert cos[0] == 0.1 and all(a > b for a, b in itertools.pairwise(cos))
    assert 0.01 < cos[-1] < 0.0106  # approaches final_lr_ratio * lr at the end of the last round
    assert round_lr(0.1, 0, 1, "cosine") == 0.1 and round_lr(0.1, 5, 20, "cosine", 1.0) == 0.1
    with pytest.raises(ValueError, match="schedule"):
        round_lr(0.1, 0, 2, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_schedule"):
        FedFwdSettings(lr_schedule="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="final_lr_ratio"):
        FedFwdSettings(final_lr_ratio=1.5)


def test_fedfwd_lr_schedule_reaches_the_devices(digits, pon_bundle):
    x, y, _, _ = digits
    shards = partition(y, PartitionConfig("iid", 3, seed=0))
    config = FFTrainConfig(objective="pon", lr=3e-3, max_steps=4)
    for sched in ("constant", "cosine"):  # the aggregator computes each round's rate and sends it in the task
        agg = with_local_training(fedavg_config(3, 3), config, FedFwdSettings(rounds=3, lr_schedule=sched))
        coord = Coordinator(agg, pon_bundle)
        lrs = []
        for _ in range(3):
            for i in range(3):
                coord.join(f"d{i}", DeviceProfile(num_samples=len(shards[i])))
            tasks = [coord.task_for(f"d{i}") for i in range(3)]
            lrs.append(tasks[0].lr)
            assert {t.lr for t in tasks} == {tasks[0].lr} and tasks[0].local_steps == 4
            version, w = coord.current_trainables()
            for i, t in enumerate(tasks):
                coord.submit_weights(f"d{i}", DeviceResult(t.round_id, version, (), (), 1, 0.5), w)
        assert lrs == [round_lr(3e-3, i, 3, sched) for i in range(3)]
    runs = {sched: run_fedfwd(pon_bundle, config, x, y, shards,
                              FedFwdSettings(rounds=3, eval_every=0, lr_schedule=sched, final_lr_ratio=0.0))
            for sched in ("constant", "cosine")}
    # same seeds and data: only the later rounds' learning rates differ, and so do the weights
    w_const, w_cos = runs["constant"].trainables, runs["cosine"].trainables
    assert not np.allclose(w_const["layers.0.weight"], w_cos["layers.0.weight"])
    one = {sched: run_fedfwd(pon_bundle, config, x, y, shards,
                             FedFwdSettings(rounds=1, eval_every=0, lr_schedule=sched)).trainables
           for sched in ("constant", "cosine")}
    np.testing.assert_array_equal(one["constant"]["layers.0.weight"], one["cosine"]["layers.0.weight"])


def test_backprop_baseline_learns(digits):
    from benchmarks.baselines_mlp import MLP, BackpropSettings, fedavg_backprop

    x, y, xt, yt = digits
    import torch

    shards = partition(y, PartitionConfig("iid", 5, seed=0))
    torch.manual_seed(0)
    recs = fedavg_backprop(MLP((64, 32, 10)), x, y, xt, yt, shards,
                           BackpropSettings(rounds=5, local_epochs=4, lr=3e-3, eval_every=0))
    assert recs[-1].accuracy is not None and recs[-1].accuracy > 0.8
    assert recs[-1].bytes_up_per_device == 4 * (64 * 32 + 32 + 32 * 10 + 10)


def test_fedfwd_benchmark_script_writes_results(tmp_path):
    from benchmarks.fedfwd import main

    assert main(["--dataset", "digits", "--hidden", "32,32", "--rounds", "3", "--local-epochs", "4",
                 "--eval-every", "1", "--bp-lr", "1e-2", "--ff-lr", "1e-2",
                 "--objectives", "pon", "--perturbed-objectives", "pon", "--perturbed-rounds", "1",
                 "--perturbed-steps", "2", "--partitions", "iid", "--lr-schedule", "cosine",
                 "--out", str(tmp_path), "--name", "ff_small"]) == 0
    result = json.loads((tmp_path / "ff_small.json").read_text())
    runs = result["partitions"]["iid"]
    assert [(r["method"], r["mode"]) for r in runs] == [("backprop", "fedavg"), ("pon", "closed_form"),
                                                        ("pon", "perturbed")]
    # the schedule is shared by both closed-form sides; perturbed mode keeps its constant SGD rate
    assert [r["lr_schedule"] for r in runs] == ["cosine", "cosine", "constant"]
    assert [len(r["curve"]) for r in runs] == [3, 3, 1]
    assert runs[0]["curve"][-1][1] > 3 * CHANCE and runs[1]["curve"][-1][1] > 3 * CHANCE
    assert (tmp_path / "ff_small.png").stat().st_size > 10_000


def test_baffle_scalar_uplink_learns_digits(tmp_path):
    from benchmarks.baffle import main

    assert main(["--datasets", "digits", "--ks", "16", "--rounds", "20", "--points", "2",
                 "--fedavg-epochs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "baffle.json").read_text())
    runs = {r["method"]: r for r in result["datasets"]["digits"]["runs"]}
    scalar = runs["scalar K=16"]
    assert scalar["curve"][-1][1] > 0.6  # chance is 0.1
    assert scalar["bytes_up_per_device_round"] < 1024  # scalars only
    assert runs["backprop fedsgd"]["bytes_up_per_device_round"] == 4 * result["datasets"]["digits"]["parameters"]
    assert (tmp_path / "baffle.png").stat().st_size > 10_000
