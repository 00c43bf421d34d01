"""Discriminative perturbation sampling: which candidates are kept, and the guide."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.perturbation import perturbation
from device_runtime.sampling import cosine_scores, guide_from_versions, select_indices
from device_runtime.task import RoundTask
from fwdfleet.bundle import TensorSpec
from fwdfleet.errors import ConfigError

N = 257


def _task(**kw) -> RoundTask:
    base = {"round_id": 0, "model_version": 0, "round_seed": 42, "device_index": 3, "num_perturbations": 5}
    return RoundTask(**{**base, **kw})


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_keeps_the_k_candidates_with_highest_abs_cosine(distribution) -> None:
    task = _task(candidate_ratio=6, k_start=100, distribution=distribution)
    guide = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    brute = {}
    for k in task.candidate_indices:
        z = perturbation(task.round_seed, task.device_index, k, N, distribution).astype(np.float64)
        brute[k] = abs(z @ guide) / (np.linalg.norm(z) * np.linalg.norm(guide))
    expected = sorted(sorted(brute, key=lambda k: -brute[k])[:5])
    kept = select_indices(task, N, guide)
    assert list(kept) == expected
    assert min(brute[k] for k in kept) >= max(brute[k] for k in set(brute) - set(kept))
    np.testing.assert_allclose(cosine_scores(task, N, guide), [brute[k] for k in task.candidate_indices], rtol=1e-5)


def test_a_candidate_equal_to_the_guide_is_kept() -> None:
    task = _task(candidate_ratio=10)
    target = 17
    guide = -perturbation(task.round_seed, task.device_index, target, N)  # sign does not matter
    assert target in select_indices(task, N, guide)
    assert cosine_scores(task, N, guide)[target] == pytest.approx(1.0)


def test_off_by_default_and_without_a_guide() -> None:
    assert select_indices(_task(k_start=9), N, np.ones(N, np.float32)) == tuple(range(9, 14))
    assert select_indices(_task(candidate_ratio=4), N, None) == tuple(range(5))
    zero = select_indices(_task(candidate_ratio=4), N, np.zeros(N, np.float32))
    assert zero == tuple(range(5))  # a zero guide scores everything 0: lowest indices win ties


def test_guide_of_the_wrong_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="257 trainable values"):
        select_indices(_task(candidate_ratio=2), N, np.ones(N + 1, np.float32))


def test_guide_from_versions_is_the_flat_difference() -> None:
    specs = (TensorSpec("a", (2, 3)), TensorSpec("b", (4,)))
    old = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    new = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.full(4, 3.0, np.float32)}
    np.testing.assert_array_equal(guide_from_versions(new, old, specs), [0, 1, 2, 3, 4, 5, 2, 2, 2, 2])
