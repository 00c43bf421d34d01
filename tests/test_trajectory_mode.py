"""The ``trajectory`` upload mode: a device's S local zeroth-order steps travel as S x K scalars and
the aggregator replays them into the device's final weights bit for bit; malformed or diverging
trajectories are refused without touching the round, and counted in its metrics."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.modes.trajectory import replay
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import dataset_for_bundle
from fwdfleet.device_runtime.modes.trajectory import run_trajectory
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.device_runtime.worker import DeviceWorker
from fwdfleet.errors import ConfigError
from fwdfleet.fleet.datasets import DatasetConfig, load_split, subset
from fwdfleet.perturbation import flatten
from fwdfleet.protocol import serde
from fwdfleet.task import DeviceProfile, DeviceResult, RoundTask

STEPS, K = 8, 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_classifier_bundle(tmp_path_factory.mktemp("mlp") / "bundle", in_dim=64, num_classes=10, hidden=16)


@pytest.fixture(scope="module")
def data(bundle: Bundle) -> Any:
    digits = load_split(DatasetConfig(name="digits"))
    return dataset_for_bundle(subset(digits.train, np.arange(300)), bundle)


def worker_for(bundle: Bundle, trainables: dict[str, np.ndarray] | None = None) -> DeviceWorker:
    w = DeviceWorker(bundle, BundleSession(bundle))
    w.set_model(0, dict(trainables if trainables is not None else bundle.load_trainables()))
    return w


@pytest.mark.parametrize(("distribution", "k_start", "device"), [("rademacher", 0, 3), ("gaussian", 40, 7)])
def test_the_replay_gives_the_devices_final_weights_bit_for_bit(bundle, data, distribution, k_start, device):
    task = RoundTask(round_id=0, model_version=0, round_seed=0xABCDEF12345, device_index=device, num_perturbations=K,
                     eps=1e-2, k_start=k_start, distribution=distribution, batch_size=16, data_seed=11,
                     upload_mode="trajectory", lr=0.3, local_steps=STEPS)
    result, final = run_trajectory(worker_for(bundle), task, data)
    assert result.indices == tuple(range(k_start, k_start + STEPS * K)) and not result.skipped
    start = flatten(bundle.load_trainables(), bundle.manifest.trainables)
    sent = serde.result_from_proto(serde.result_to_proto(result.for_upload()))  # float32 derivatives on the wire
    replayed = replay(start, sent.indices, sent.derivatives, round_seed=task.round_seed, device=device,
                      num_perturbations=K, lr=task.lr, distribution=distribution)
    assert np.array_equal(replayed, final)
    assert not np.array_equal(final, start)  # the steps moved the weights
    # one replayed step fewer (or another seed) is not the same point: the test can fail
    assert not np.array_equal(replay(start, result.indices[:-K], result.derivatives[:-K], round_seed=task.round_seed,
                                     device=device, num_perturbations=K, lr=task.lr, distribution=distribution), final)
    assert serde.result_to_proto(result.for_upload()).ByteSize() < 1024  # 32 pairs: under 1 KB up


def fleet_config(tmp: Path, **local: Any) -> Any:
    return config_from_dict({
        "mode": "trajectory", "metrics_path": str(tmp / "metrics.jsonl"),
        "rounds": {"min_devices": 2, "min_results": 2, "deadline_s": 600.0, "batch_size": 16, "num_rounds": 3},
        "perturbation": {"k": K, "eps": 0.01}, "optimizer": {"name": "sgd", "lr": 1.0},
        "local": {"lr": 0.3, "steps": STEPS, **local}, "validation": {"max_abs_derivative": 1e41}})


def joined(bundle: Bundle, config: Any) -> Coordinator:
    c = Coordinator(config, bundle, clock=lambda: 1000.0)
    for d in ("a", "b"):
        c.join(d, DeviceProfile())
    return c


def honest(c: Coordinator, bundle: Bundle, data: Any, device: str) -> tuple[RoundTask, DeviceResult, np.ndarray]:
    task = c.task_for(device)
    assert task is not None and task.local_steps == STEPS and task.num_perturbations == K
    result, final = run_trajectory(worker_for(bundle, c.current_trainables()[1]), task, data)
    return task, result, final


def test_the_coordinator_keeps_the_replayed_weights_of_each_device(bundle, data, tmp_path):
    c = joined(bundle, fleet_config(tmp_path))
    _, result, final = honest(c, bundle, data, "a")
    c.submit("a", result)
    kept = c._round.kept["a"]  # (device index, samples, weights): what the round averages
    assert np.array_equal(kept[2], final)


def forged(result: DeviceResult, **fields: Any) -> DeviceResult:
    """``result`` with fields a device might send but DeviceResult() would refuse to build."""
    out = replace(result)
    for name, value in fields.items():
        object.__setattr__(out, name, value)
    return out


def test_bad_trajectories_are_refused_with_a_status_and_counted(bundle, data, tmp_path):
    c = joined(bundle, fleet_config(tmp_path))
    _, r, _ = honest(c, bundle, data, "a")
    n = STEPS * K
    shifted = tuple(range(1, n + 1))
    swapped = (r.indices[1], r.indices[0], *r.indices[2:])
    cases = [
        (replace(r, indices=r.indices[:-K], derivatives=r.derivatives[:-K]), RejectCode.MALFORMED,
         f"holds {STEPS - 1} steps of {K} probes"),
        (replace(r, indices=r.indices[:-1], derivatives=r.derivatives[:-1]), RejectCode.MALFORMED,
         f"{n - 1} scalars, not a whole number of steps"),
        (replace(r, indices=shifted), RejectCode.BAD_INDEX, "pair 0 has index 1"),
        (replace(r, indices=swapped), RejectCode.BAD_INDEX, "pair 0 has index 1"),
        (forged(r, derivatives=(math.nan, *r.derivatives[1:])), RejectCode.NON_FINITE, "non-finite"),
        (replace(r, indices=r.indices[1:], derivatives=r.derivatives[1:], skipped=(r.indices[0],)),
         RejectCode.NON_FINITE, "non-finite loss"),
        # finite scalars whose replayed steps overflow float32 (the bound on |d| is raised in this config)
        (replace(r, derivatives=tuple(1e40 for _ in r.derivatives)), RejectCode.NON_FINITE,
         "replaying this trajectory leaves"),
    ]
    before = c.current_trainables()[1]
    for bad, code, words in cases:
        with pytest.raises(RejectedError) as e:
            c.submit("a", bad)
        assert e.value.code == code and words in str(e.value), (code, str(e.value))
        status = c.status()
        assert status.results == 0 and status.model_version == 0
        assert not c._round.kept and not c._round.answered and c._round.bytes_up == 0
    with pytest.raises(RejectedError) as e:
        c.submit_dense("a", replace(r, indices=(), derivatives=()), np.zeros(bundle.manifest.num_trainable))
    assert e.value.code == RejectCode.MALFORMED
    for name, value in c.current_trainables()[1].items():
        assert np.array_equal(value, before[name])
    # the honest uploads still count; the round closes and its metrics count the refusals
    c.submit("a", r)
    c.submit("b", honest(c, bundle, data, "b")[1])
    assert c.status().model_version == 1
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["rejected"] == {"BAD_INDEX": 2, "MALFORMED": 3, "NON_FINITE": 3}
    assert metrics["participants"] == 2


def test_a_config_whose_trajectories_cannot_be_replayed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"local\.steps >= 1"):
        fleet_config(tmp_path, steps=0)
    with pytest.raises(ConfigError, match=r"local\.lr > 0"):
        fleet_config(tmp_path, lr=0.0)


def test_the_round_update_is_the_mean_of_the_replayed_weights(bundle, data, tmp_path):
    c = joined(bundle, fleet_config(tmp_path))
    finals = []
    for d in ("a", "b"):
        _, result, final = honest(c, bundle, data, d)
        c.submit(d, result)
        finals.append(final)
    assert c.status().model_version == 1
    got = flatten(c.current_trainables()[1], bundle.manifest.trainables)
    np.testing.assert_allclose(got, (finals[0] + finals[1]) / 2, rtol=0, atol=1e-6)
