"""The Ray backend on a local Ray instance: two actors give exactly the in-process pool's results."""

from __future__ import annotations

import pytest
from _prereqs import dev_dependency
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.emulate import ComputePool, EmulationSettings, emulate
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile
from fwdfleet.task import RoundTask

ray = dev_dependency("ray")  # also the optional `ray` extra; the dev extra has it, so it is never skipped


def numbers(results):
    return [(d, u.result.indices, u.result.derivatives, u.result.num_samples, u.result.loss_mean, u.result.loss_std,
             u.result.skipped) for d, u in results]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_pool_matches_in_process_pool_and_runs_a_fleet(local_ray, tmp_path):
    from fwdfleet.fleet.ray_backend import RayComputePool

    data = load_split(DatasetConfig(name="digits"))
    bundle = make_classifier_bundle(tmp_path / "bundle", in_dim=64, num_classes=10, hidden=16)
    shards = partition(data.train.labels, PartitionConfig("dirichlet", 6, alpha=1.0, seed=0))
    jobs = [(i, RoundTask(0, 0, 1234, i, 8, batch_size=16, data_seed=10 + i)) for i in (5, 2, 0, 4, 1, 3)]
    trainables = bundle.load_trainables()
    moved = {k: v + 0.01 for k, v in trainables.items()}

    local = ComputePool(bundle, data.train, shards, EmulationSettings(workers=1))
    remote = RayComputePool(bundle, data.train, shards, EmulationSettings(workers=2, backend="ray"))
    try:
        assert numbers(remote.run(0, trainables, jobs)) == numbers(local.run(0, trainables, jobs))
        # a new model version reaches every actor
        again = numbers(remote.run(1, moved, jobs))
        assert again == numbers(local.run(1, moved, jobs))
        assert again != numbers(local.run(0, trainables, jobs))
    finally:
        local.close()
        remote.close()
    assert ray.is_initialized()  # the pool did not own this Ray instance, so it left it running

    # the whole emulation loop on the Ray backend gives the in-process records
    config = config_from_dict({"rounds": {"min_devices": 4, "batch_size": 16}, "perturbation": {"k": 4}})
    profiles = [EmulatedProfile(dropout=0.2)] * 6

    def records(backend: str, workers: int) -> list[tuple]:
        settings = EmulationSettings(rounds=2, workers=workers, backend=backend, eval_every=1)
        return [(r.model_version, r.participants, r.dropouts, r.loss, r.accuracy, r.bytes_up)
                for r in emulate(bundle, config, data.train, shards, profiles, settings, test=data.test)]

    assert records("ray", 2) == records("process", 1)
