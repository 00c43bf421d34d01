"""One round engine on every transport: each upload mode (``trajectory`` too: its replay must match
the devices' steps on every transport) trains the digits fleet in-process, over
real gRPC (TLS server on 127.0.0.1 port 0, real device clients in threads) and on Ray actors, and
a FedFwd run gives the same weights bit for bit through the emulation and through gRPC devices."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _grpc_fixtures import FLEET_TOKEN, make_env, start
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.client import DeviceClient, DeviceClientConfig
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle
from fwdfleet.device_runtime.ff_train import FFTrainConfig
from fwdfleet.fleet.datasets import DatasetConfig, load_split, subset
from fwdfleet.fleet.emulate import EmulationSettings, Evaluator, emulate
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MODES = ("scalar", "dense", "fedavg", "trajectory")
DEVICES = 4
ROUNDS = 12
FLOOR = 0.5  # test accuracy after ROUNDS rounds (chance: 0.1; a broken engine stays near it)
MODE_TABLES: dict[str, dict[str, Any]] = {
    "scalar": {"optimizer": {"name": "sgd", "lr": 0.5}},
    "dense": {"optimizer": {"name": "sgd", "lr": 0.5}},
    "fedavg": {"optimizer": {"name": "sgd", "lr": 1.0}, "local": {"lr": 0.3, "steps": 5}},
    # the same local steps as fedavg's, uploaded as 5 x 8 scalars and replayed on the server
    "trajectory": {"optimizer": {"name": "sgd", "lr": 1.0}, "local": {"lr": 0.3, "steps": 5}},
}


def mode_config(mode: str) -> Any:
    return config_from_dict({"mode": mode, "rounds": {"min_devices": DEVICES, "min_results": DEVICES,
                                                      "deadline_s": 60.0, "batch_size": 32, "num_rounds": ROUNDS},
                             "perturbation": {"k": 8, "eps": 0.01}, **MODE_TABLES[mode]})


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_split(DatasetConfig(name="digits"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_classifier_bundle(tmp_path_factory.mktemp("mlp") / "bundle", in_dim=64, num_classes=10, hidden=16)


@pytest.fixture(scope="module")
def shards(digits: Any) -> list[np.ndarray]:
    return partition(digits.train.labels, PartitionConfig("iid", DEVICES, seed=0))


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def grpc_fleet(tmp: Path, bundle: Bundle, config: Any, train: RawData, shards: list[np.ndarray],
               **client_kw: Any) -> dict[str, np.ndarray]:
    """Real TLS server + one DeviceClient thread per shard (joined in order); the final trainables."""
    env = dataclasses.replace(make_env(tmp), bundle=bundle)
    server = start(env, config)
    coordinator = server.servicer.coordinator
    clients: list[DeviceClient] = []
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def run(c: DeviceClient) -> None:
        try:
            c.run()
        except BaseException as e:  # surfaced below: a dead device must fail the test, not stall it
            errors.append(e)

    try:
        for i, shard in enumerate(shards):
            device_id = f"device-{i:05d}"  # the emulation's ids, joined in its order: the same device indices
            data = dataset_for_bundle(subset(train, shard), bundle)
            cfg = DeviceClientConfig(address=f"127.0.0.1:{server.port}", device_id=device_id, token=FLEET_TOKEN,
                                     root_cert=str(env.certs["ca"]), long_poll_s=0.5, initial_backoff_s=0.05,
                                     max_backoff_s=0.3, rpc_timeout_s=10)
            clients.append(DeviceClient(cfg, tmp / device_id, data, seed=i, **client_kw))
            threads.append(threading.Thread(target=run, args=(clients[-1],), daemon=True))
            threads[-1].start()
            wait_for(lambda i=i: coordinator.status().devices_registered == i + 1, 30, f"device {i} to join")
        rounds = config.rounds.num_rounds
        wait_for(lambda: errors or coordinator.status().rounds_completed >= rounds, 120, f"{rounds} rounds")
        assert not errors, errors
        return coordinator.current_trainables()[1]
    finally:
        for c in clients:
            c.stop()
        server.stop()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a device thread did not finish after stop()"
        assert all(c.stats.dropped == 0 for c in clients), [c.stats for c in clients]


def accuracy(bundle: Bundle, digits: Any, trainables: Mapping[str, np.ndarray]) -> float:
    return Evaluator(bundle, digits.test, 512)(trainables)[1]


def emulated(bundle: Bundle, digits: Any, shards: list[np.ndarray], mode: str, **settings: Any) -> float:
    final: dict[str, np.ndarray] = {}
    records = list(emulate(bundle, mode_config(mode), digits.train, shards, [EmulatedProfile()] * DEVICES,
                           EmulationSettings(rounds=ROUNDS, eval_every=0, **settings),
                           on_done=lambda _v, w: final.update(w)))
    assert [r.model_version for r in records] == list(range(1, ROUNDS + 1))
    return accuracy(bundle, digits, final)


@pytest.mark.parametrize("mode", MODES)
def test_in_process(bundle, digits, shards, mode):
    assert emulated(bundle, digits, shards, mode) > FLOOR


@pytest.mark.parametrize("mode", MODES)
def test_grpc(bundle, digits, shards, mode, tmp_path):
    trainables = grpc_fleet(tmp_path, bundle, mode_config(mode), digits.train, shards)
    assert accuracy(bundle, digits, trainables) > FLOOR


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_ray(local_ray, bundle, digits, shards, mode):
    assert emulated(bundle, digits, shards, mode, backend="ray", workers=2) > FLOOR


def test_fedfwd_through_the_emulation_equals_grpc_devices_bit_for_bit(digits, tmp_path):
    """Same seeds, same tasks: the learning rate of each round (a cosine schedule) travels in the task,
    so real devices reproduce the emulated FedFwd run exactly."""
    pytest.importorskip("torch")  # the FF bundle is exported with torch
    from fwdfleet.bundle import load_bundle
    from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp
    from fwdfleet.fleet.fedfwd import FedFwdSettings, fedavg_config, run_fedfwd, with_local_training

    ff = load_bundle(export_ff_mlp(FFMLPConfig(layers=(64, 32, 32), heads="softmax", seed=0), tmp_path / "ff"))
    x, y = digits.train.features, digits.train.labels
    shards = partition(y, PartitionConfig("dirichlet", 3, alpha=0.5, seed=1))
    train = FFTrainConfig(objective="pon", lr=3e-3, batch_size=32)
    settings = FedFwdSettings(rounds=3, eval_every=0, lr_schedule="cosine", final_lr_ratio=0.1)
    emulated_run = run_fedfwd(ff, train, x, y, shards, settings, test=(digits.test.features, digits.test.labels))
    config = with_local_training(fedavg_config(len(shards), settings.rounds), train, settings)
    over_grpc = grpc_fleet(tmp_path / "grpc", ff, config, digits.train, shards, ff_train=train)
    assert set(over_grpc) == set(emulated_run.trainables)
    for name, value in emulated_run.trainables.items():
        np.testing.assert_array_equal(over_grpc[name], value, err_msg=name)
    assert not np.array_equal(over_grpc["layers.0.weight"], ff.load_trainables()["layers.0.weight"])
    assert emulated_run.records[-1].accuracy is not None and emulated_run.records[-1].accuracy > 0.5
