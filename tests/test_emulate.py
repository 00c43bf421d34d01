"""In-process fleet emulation against the real Coordinator, with real onnxruntime sessions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.emulate import ComputePool, EmulationSettings, RoundRecord, emulate, in_job_order
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile, preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() in a threaded process


@pytest.fixture(scope="module")
def digits():
    return load_split(DatasetConfig(name="digits"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_classifier_bundle(tmp_path_factory.mktemp("mlp") / "bundle", in_dim=64, num_classes=10, hidden=16)


def agg(k: int = 8, **rounds) -> object:
    table = {"min_devices": 4, "min_results": 4, "deadline_s": 60.0, "batch_size": 32, **rounds}
    return config_from_dict({"rounds": table, "perturbation": {"k": k, "eps": 0.01},
                             "optimizer": {"name": "sgd", "lr": 0.5}})


def run(bundle, data, *, devices=8, profiles=None, test=True, **settings) -> list[RoundRecord]:
    shards = partition(data.train.labels, PartitionConfig("dirichlet", devices, alpha=1.0, seed=0))
    profiles = profiles or [EmulatedProfile()] * devices
    config = settings.pop("config", None) or agg()
    return list(emulate(bundle, config, data.train, shards, profiles, EmulationSettings(**settings),
                        test=data.test if test else None))


def comparable(records: list[RoundRecord]) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("wall_time_s", "sim_time_s")}
            for r in records]


def test_identical_across_worker_counts(bundle, digits):
    # Profiles differ in dropout, so the dropout draws must land on the same devices whatever pool ran them.
    profiles = [EmulatedProfile(dropout=0.25 if i % 2 else 0.0) for i in range(10)]
    one = run(bundle, digits, devices=10, profiles=profiles, rounds=4, workers=1, eval_every=2)
    two = run(bundle, digits, devices=10, profiles=profiles, rounds=4, workers=2, eval_every=2)
    assert len(one) == 4
    assert comparable(one) == comparable(two)
    assert one[-1].accuracy is not None
    assert sum(r.dropouts for r in one) > 0


def test_pool_results_come_back_in_job_order(bundle, digits):
    from fwdfleet.task import RoundTask

    shards = partition(digits.train.labels, PartitionConfig("iid", 5, seed=1))
    jobs = [(i, RoundTask(0, 0, 99, i, 4, batch_size=8, data_seed=i)) for i in (3, 0, 4, 1, 2)]
    local = ComputePool(bundle, digits.train, shards, EmulationSettings(workers=1))
    pooled = ComputePool(bundle, digits.train, shards, EmulationSettings(workers=2))
    try:
        a = local.run(0, bundle.load_trainables(), jobs)
        b = pooled.run(0, bundle.load_trainables(), jobs)
    finally:
        local.close()
        pooled.close()
    assert [d for d, _ in b] == [3, 0, 4, 1, 2]
    assert [r.result.derivatives for _, r in a] == [r.result.derivatives for _, r in b]
    assert in_job_order(jobs[:2], list(reversed(b[:2]))) == b[:2]


def test_learns_digits(bundle, digits):
    records = run(bundle, digits, devices=10, rounds=20, eval_every=10)
    assert [r.model_version for r in records] == list(range(1, 21))
    assert records[-1].accuracy is not None and records[-1].accuracy > 0.4  # chance is 0.1
    assert records[-1].loss < records[9].loss


def test_dropouts_and_stragglers_counted(bundle, digits):
    # Half the devices drop out a third of the time; a quarter are so slow that they always miss the deadline.
    slow = EmulatedProfile("slow", compute_speed=1e-6)
    flaky = EmulatedProfile("flaky", dropout=0.34)
    profiles = [slow if i % 4 == 0 else flaky if i % 2 else EmulatedProfile() for i in range(12)]
    records = run(bundle, digits, devices=12, profiles=profiles, rounds=3, test=False,
                  config=agg(min_devices=12, min_results=4, deadline_s=5.0))
    assert len(records) == 3
    assert sum(r.dropouts for r in records) > 0
    assert sum(r.stragglers for r in records) >= 3 * 3  # the three slow devices, every round
    assert all(r.participants <= 12 - 3 for r in records)  # a straggler never counts
    assert records[-1].sim_time_s >= 3 * 5.0  # every round ran into its deadline


@pytest.mark.parametrize("k", [8, 64])
def test_uplink_is_scalars_only(bundle, digits, k):
    records = run(bundle, digits, devices=6, rounds=2, test=False, config=agg(k=k))
    dense = 4 * bundle.manifest.num_trainable
    for r in records:
        assert 0 < r.bytes_up_per_device < 1024, r
        assert r.bytes_up_per_device < dense / 4
    assert np.isclose(records[0].bytes_up, records[0].bytes_up_per_device * records[0].participants, rtol=0.05)


def test_settings_validate():
    with pytest.raises(ValueError, match="backend"):
        EmulationSettings(backend="spark")
    with pytest.raises(ValueError, match="workers"):
        EmulationSettings(workers=0)
    assert preset("budget-phone").compute_speed < 1


def test_discriminative_sampling_is_guided_by_the_last_update(bundle, digits):
    """With candidate_ratio > 1 a virtual device scores its pool against w_t - w_{t-1}, as a real one does."""
    from fwdfleet.device_runtime.sampling import guide_from_versions, select_indices
    from fwdfleet.fleet.emulate import DeviceCompute
    from fwdfleet.task import RoundTask

    shards = partition(digits.train.labels, PartitionConfig("iid", 2, seed=0))
    compute = DeviceCompute(str(bundle.path), digits.train, shards, threads=1)
    w0 = bundle.load_trainables()
    rng = np.random.default_rng(3)
    w1 = {k: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in w0.items()}
    task = RoundTask(round_id=1, model_version=1, round_seed=11, device_index=1, num_perturbations=3,
                     candidate_ratio=5, batch_size=16)
    compute.run(0, w0, [])
    (_, upload), = compute.run(1, w1, [(0, task)])
    result = upload.result
    n = bundle.manifest.num_trainable
    guided = select_indices(task, n, guide_from_versions(w1, w0, bundle.manifest.trainables))
    assert list(result.indices) == list(guided)  # the pool's best K, in the order select_indices gives
    assert set(result.indices) != set(range(3))  # not just the first K of the pool
