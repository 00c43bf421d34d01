"""Discriminative perturbation sampling: which candidates are kept, and the guide."""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.bundle import TensorSpec
from fwdfleet.device_runtime.sampling import cosine_scores, guide_from_versions, select_indices
from fwdfleet.errors import ConfigError
from fwdfleet.perturbation import perturbation, perturbation_chunks, perturbation_slice, random_words
from fwdfleet.task import RoundTask

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


# ------------------------------------------------------------------ chunked regeneration of z


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("chunk", [1, 7, 32, 100, 4096, 10_000])
def test_chunks_are_bit_identical_to_the_whole_vector(distribution, chunk) -> None:
    n = 5_003  # not a multiple of 32 or of the chunk
    whole = perturbation(0xDEADBEEF12345678, 9, 31, n, distribution)
    got = np.full(n, np.nan, np.float32)
    buf = np.empty(chunk, np.float32)
    for start, zc in perturbation_chunks(0xDEADBEEF12345678, 9, 31, n, distribution, buf):
        got[start : start + zc.size] = zc
    np.testing.assert_array_equal(got.view(np.uint32), whole.view(np.uint32))
    part = perturbation_slice(0xDEADBEEF12345678, 9, 31, 33, 1_234, distribution, np.empty(2_000, np.float32))
    np.testing.assert_array_equal(part.view(np.uint32), whole[33:1_234].view(np.uint32))


def test_rademacher_words_in_block_chunks_and_scaled_signs(monkeypatch) -> None:
    import fwdfleet.perturbation as sampling

    monkeypatch.setattr(sampling, "WORD_BLOCKS", 3)  # 12 words per Philox call: many calls
    n = 1_000
    words = sampling.rademacher_words(5, 1, 2, n)
    np.testing.assert_array_equal(words, random_words(5, 1, 2, (n + 31) // 32))
    z = perturbation(5, 1, 2, n)
    out = np.empty(n, np.float32)
    scale = np.float32(0.0123)
    for start, stop in ((17, 900), (16, 904), (3, 6), (8, 16), (0, n), (999, 1_000), (5, 5)):  # partial and whole bytes
        got = sampling.expand_rademacher(words, start, stop, out, float(scale))
        np.testing.assert_array_equal(got.view(np.uint32), (z[start:stop] * scale).view(np.uint32))


# ------------------------------------------------------------------ does sampling do what it claims


def test_a_gradient_guide_selects_directions_with_larger_derivatives(tmp_path) -> None:
    """With the gradient as guide, the kept z have larger |d_k| and the estimate aligns better with
    the gradient than without sampling (the mechanism the benchmark measures)."""
    from _tiny_bundles import make_classifier_bundle

    from fwdfleet.device_runtime.estimator import accumulate_update, estimate
    from fwdfleet.device_runtime.session import BundleSession, SessionOptions
    from fwdfleet.perturbation import flatten

    bundle = make_classifier_bundle(tmp_path / "b", in_dim=16, num_classes=3, seed=1)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    rng = np.random.default_rng(0)
    trainables = {
        k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in bundle.load_trainables().items()
    }
    batch = {"x": rng.standard_normal((64, 16)).astype(np.float32), "labels": rng.integers(0, 3, 64).astype(np.int64)}
    n = bundle.manifest.num_trainable
    guide = _numeric_gradient(session, flatten(trainables, session.trainable_specs), batch)
    stats = {}
    for ratio in (1, 10):
        size, cos = [], []
        for s in range(20):
            task = _task(round_seed=100 + s, num_perturbations=2, candidate_ratio=ratio, eps=1e-3)
            result = estimate(session, trainables, batch, task, guide if ratio > 1 else None)
            g_hat = accumulate_update(result, task, n).astype(np.float64)
            size.append(np.mean(np.abs(result.derivatives)))
            cos.append(g_hat @ guide / (np.linalg.norm(g_hat) * np.linalg.norm(guide)))
        stats[ratio] = (float(np.mean(size)), float(np.mean(cos)))
    assert stats[10][0] > 1.5 * stats[1][0], stats
    assert stats[10][1] > stats[1][1] + 0.1, stats


def _numeric_gradient(session, w: np.ndarray, batch, h: float = 1e-3) -> np.ndarray:
    from fwdfleet.perturbation import split

    probe = w.copy()
    runner = session.bind(split(probe, session.trainable_specs), batch)
    g = np.zeros(w.size, np.float32)
    for i in range(w.size):
        probe[i] = w[i] + h
        plus = float(runner.run()["loss"].mean())
        probe[i] = w[i] - h
        minus = float(runner.run()["loss"].mean())
        probe[i] = w[i]
        g[i] = (plus - minus) / (2 * h)
    return g


def test_sampling_benefit_benchmark_smoke(tmp_path) -> None:
    """benchmarks/sampling_benefit.py's curves on a torch-free bundle of the digits MLP's shape."""
    pytest.importorskip("sklearn")
    from _tiny_bundles import make_classifier_bundle

    from benchmarks.sampling_benefit import run_curves

    bundle = make_classifier_bundle(tmp_path / "mlp", in_dim=64, num_classes=10, hidden=32)
    curves = run_curves(bundle.path, [1, 4], seeds=1, steps=60, k=4, lr=0.05, eps=1e-2, eval_every=30)
    assert set(curves) == {"1", "4"}
    for c in curves.values():
        assert c["forward_passes"] == [0, 240, 480]  # equal forward passes whatever the ratio
        assert c["accuracy"][-1] > c["accuracy"][0] and c["loss"][-1] < c["loss"][0]
