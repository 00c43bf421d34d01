"""Every upload mode through the in-process emulation: it learns, and a refused upload is an error.

The emulation once swallowed every rejection, so ``mode = "dense"`` or ``"fedavg"`` (whose uploads
the scalar path refused) looped forever printing ``rounds: 0/3``; these tests run under an alarm.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.emulate import EmulationSettings, emulate
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile


class _Hang(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (instead of hanging the suite) when a test runs longer than 60 s."""

    def fire(signum, frame):
        raise _Hang("the run did not finish within 60 s (the emulation loops on refused uploads)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def digits():
    return load_split(DatasetConfig(name="digits"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_classifier_bundle(tmp_path_factory.mktemp("mlp") / "bundle", in_dim=64, num_classes=10, hidden=16)


MODE_TABLES = {
    "scalar": {"optimizer": {"name": "sgd", "lr": 0.5}},
    "dense": {"optimizer": {"name": "sgd", "lr": 0.5}},
    "fedavg": {"optimizer": {"name": "sgd", "lr": 1.0}, "local": {"lr": 0.3, "steps": 5}},
}


def mode_config(mode: str) -> object:
    return config_from_dict({"mode": mode, "rounds": {"min_devices": 6, "min_results": 6, "deadline_s": 60.0,
                                                      "batch_size": 32},
                             "perturbation": {"k": 8, "eps": 0.01}, **MODE_TABLES[mode]})


@pytest.mark.parametrize("mode", ["scalar", "dense", "fedavg"])
def test_every_mode_finishes_and_learns_in_process(alarm, bundle, digits, mode):
    shards = partition(digits.train.labels, PartitionConfig("iid", 6, seed=0))
    records = list(emulate(bundle, mode_config(mode), digits.train, shards, [EmulatedProfile()] * 6,
                           EmulationSettings(rounds=12, eval_every=12), test=digits.test))
    assert [r.model_version for r in records] == list(range(1, 13))
    assert all(r.participants == 6 for r in records)
    assert records[-1].accuracy is not None and records[-1].accuracy > 0.5, records[-1]


# ----------------------------------------------------------------------------- the coordinator side

from fwdfleet.aggregator.config import AggregatorConfig, RoundsConfig  # noqa: E402
from fwdfleet.aggregator.coordinator import Coordinator  # noqa: E402
from fwdfleet.aggregator.errors import RejectCode, RejectedError  # noqa: E402
from fwdfleet.aggregator.modes import server_mode, server_mode_names  # noqa: E402
from fwdfleet.device_runtime.worker import device_mode  # noqa: E402
from fwdfleet.errors import ConfigError  # noqa: E402
from fwdfleet.modes import mode_names  # noqa: E402
from fwdfleet.protocol import serde  # noqa: E402
from fwdfleet.task import DeviceProfile, DeviceResult, Upload  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_both_registries_hold_the_same_modes_and_unknown_names_are_refused():
    assert server_mode_names() == mode_names("fwdfleet.device_runtime.modes")
    assert {"scalar", "dense", "fedavg"} <= set(server_mode_names())
    for name in server_mode_names():
        assert server_mode(name).carries == device_mode(name).carries
    with pytest.raises(ConfigError, match=r"unknown upload mode 'sclar'.*scalar"):
        server_mode("sclar")
    with pytest.raises(ValueError, match="mode must be one of"):
        AggregatorConfig(mode="sclar")


def test_status_is_a_read_and_never_advances_a_round(bundle):
    clock = Clock()
    config = AggregatorConfig(rounds=RoundsConfig(min_devices=2, min_results=2, deadline_s=10.0, max_extensions=0))
    coord = Coordinator(config, bundle, clock=clock)
    for d in ("a", "b"):
        coord.join(d, DeviceProfile())
    before = coord.status()
    assert before.state == "open" and before.attempt == 0
    clock.now += 60.0  # past the deadline with no results: the round restarts, but only when processed
    assert coord.status() == coord.status() == before
    kinds = [e.kind for e in coord.advance()]
    assert "round_restarted" in kinds
    after = coord.status()
    assert after.attempt == 1 and after.deadline != before.deadline


def _two_fedavg_devices(bundle, declared=(0, 0), steps=2):
    config = AggregatorConfig(mode="fedavg", rounds=RoundsConfig(min_devices=2, min_results=2, batch_size=8),
                              local=__import__("fwdfleet.aggregator.config", fromlist=["LocalConfig"])
                              .LocalConfig(lr=0.1, steps=steps))
    coord = Coordinator(config, bundle, clock=Clock())
    for d, shard in zip(("honest", "greedy"), declared):
        coord.join(d, DeviceProfile(num_samples=shard))
    return coord


def test_a_fedavg_device_cannot_weigh_more_than_the_task_allowed(bundle):
    """Issue 18: a claimed count of 4,294,967,295 made the global model one device's weights."""
    coord = _two_fedavg_devices(bundle)
    n = bundle.manifest.num_trainable
    tasks = {d: coord.task_for(d) for d in ("honest", "greedy")}
    assert tasks["honest"].local_steps == 2 and tasks["honest"].lr == pytest.approx(0.1)
    wire = serde.result_from_proto(serde.result_to_proto(DeviceResult(0, 0, (), (), 2**32 - 1, 1.0)))
    assert wire.num_samples == 2**32 - 1  # what a -1 varint decodes to
    greedy = Upload(DeviceResult(0, 0, (), (), 2**32 - 1, 1.0), np.full(n, 5.0, np.float32))
    with pytest.raises(RejectedError) as e:
        coord.submit_upload("greedy", greedy)
    assert e.value.code is RejectCode.TOO_LARGE and "16" in str(e.value)  # 8 x 2 steps
    ok = Upload(DeviceResult(0, 0, (), (), 16, 1.0), np.zeros(n, np.float32))
    assert coord.submit_upload("honest", ok).accepted
    assert coord.status().results == 1  # the refused upload was not counted


def test_the_shard_declared_at_join_bounds_a_fedavg_weight(bundle):
    coord = _two_fedavg_devices(bundle, declared=(5, 5), steps=0)  # epochs: only the declared shard bounds it
    n = bundle.manifest.num_trainable
    coord.task_for("greedy")
    with pytest.raises(RejectedError, match="shard size declared at join"):
        coord.submit_upload("greedy", Upload(DeviceResult(0, 0, (), (), 6, 1.0), np.zeros(n, np.float32)))
    assert coord.submit_upload("greedy", Upload(DeviceResult(0, 0, (), (), 5, 1.0), np.zeros(n, np.float32))).accepted


def test_a_scalar_device_cannot_claim_more_than_its_minibatch(bundle):
    config = AggregatorConfig(rounds=RoundsConfig(min_devices=1, batch_size=8))
    coord = Coordinator(config, bundle, clock=Clock())
    coord.join("a", DeviceProfile())
    task = coord.task_for("a")
    big = DeviceResult(task.round_id, task.model_version, (0,), (0.5,), 10**6, 1.0)
    with pytest.raises(RejectedError) as e:
        coord.submit("a", big)
    assert e.value.code is RejectCode.TOO_LARGE
    assert coord.submit("a", DeviceResult(task.round_id, task.model_version, (0,), (0.5,), 8, 1.0)).accepted


def test_a_mode_the_bundle_cannot_run_is_refused_before_any_round(bundle, digits):
    """A bundle whose 'model' graph takes only some trainables cannot upload a dense gradient of all,
    and one without a loss graph cannot be perturbed: both are refused before the first round."""
    import dataclasses

    m = bundle.manifest
    first = m.trainables[0].name
    partial = dataclasses.replace(m, graphs=tuple(dataclasses.replace(g, trainables=(first,)) for g in m.graphs))
    partial_bundle = dataclasses.replace(bundle, manifest=partial)
    shards = partition(digits.train.labels, PartitionConfig("iid", 2, seed=0))
    with pytest.raises(ConfigError, match=r"mode 'dense' uploads a gradient of every trainable.*use mode 'scalar'"):
        next(emulate(partial_bundle, AggregatorConfig(mode="dense"), digits.train, shards, [EmulatedProfile()] * 2,
                     EmulationSettings(rounds=1)))
    no_loss = dataclasses.replace(m, graphs=tuple(
        dataclasses.replace(g, outputs=tuple(o for o in g.outputs if o.name != "loss")) for g in m.graphs))
    for mode in ("scalar", "dense"):
        with pytest.raises(ConfigError, match=f"mode '{mode}' perturbs a bundle's 'model' graph"):
            Coordinator(AggregatorConfig(mode=mode), dataclasses.replace(bundle, manifest=no_loss))
    Coordinator(AggregatorConfig(mode="fedavg"), partial_bundle)  # local training needs neither
