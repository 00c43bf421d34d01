"""Reconstruction: equals the explicit dense sum, ignores arrival order, stays O(n) in memory."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from fwdfleet.aggregator.config import RobustConfig
from fwdfleet.aggregator.reconstruct import Accumulator, Contribution, accumulate, reconstruct
from fwdfleet.perturbation import perturbation

SEED = 0xDEADBEEF12345


def _contribs(num_devices: int, k: int, *, shared: bool, rng: np.random.Generator, k_start: int = 0):
    return [
        Contribution(device_index=i + 1, indices=tuple(range(k_start, k_start + k)),
                     derivatives=tuple(float(x) for x in rng.standard_normal(k)))
        for i in range(num_devices)
    ]


def _explicit(contribs, n, shared, distribution="rademacher"):
    total = np.zeros(n, dtype=np.float64)
    pairs = 0
    for c in contribs:
        for k, d in zip(c.indices, c.derivatives, strict=True):
            total += d * perturbation(SEED, 0 if shared else c.device_index, k, n, distribution).astype(np.float64)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_reconstruct_equals_explicit_dense_sum(shared: bool, distribution: str) -> None:
    rng = np.random.default_rng(1)
    n = 1003  # not a multiple of 32: exercises the tail of the bit stream
    contribs = _contribs(7, 5, shared=shared, rng=rng, k_start=3)
    got = reconstruct(contribs, n=n, round_seed=SEED, distribution=distribution, shared_seeds=shared)
    want = _explicit(contribs, n, shared, distribution)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got64 = reconstruct(contribs, n=n, round_seed=SEED, distribution=distribution, shared_seeds=shared,
                        dtype=np.float64)
    np.testing.assert_allclose(got64, want, rtol=1e-6, atol=1e-6)


def test_per_device_seeds_differ_from_shared() -> None:
    rng = np.random.default_rng(2)
    contribs = _contribs(3, 4, shared=False, rng=rng)
    a = reconstruct(contribs, n=64, round_seed=SEED, shared_seeds=False)
    b = reconstruct(contribs, n=64, round_seed=SEED, shared_seeds=True)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("shared", [False, True])
def test_result_does_not_depend_on_arrival_order(shared: bool) -> None:
    rng = np.random.default_rng(3)
    contribs = _contribs(40, 6, shared=shared, rng=rng)
    ref = reconstruct(contribs, n=500, round_seed=SEED, shared_seeds=shared)
    shuffled = contribs[:]
    random.Random(0).shuffle(shuffled)
    again = reconstruct(shuffled, n=500, round_seed=SEED, shared_seeds=shared)
    assert ref.tobytes() == again.tobytes()


def test_true_directional_derivatives_recover_the_gradient() -> None:
    n = 40
    grad = np.random.default_rng(4).standard_normal(n)
    contribs = [
        Contribution(i + 1, tuple(range(8)),
                     tuple(float(grad @ perturbation(SEED, i + 1, k, n)) for k in range(8)))
        for i in range(200)
    ]
    g = reconstruct(contribs, n=n, round_seed=SEED).astype(np.float64)
    cos = g @ grad / (np.linalg.norm(g) * np.linalg.norm(grad))
    assert cos > 0.97


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_per_seed_robust_statistics_resist_an_outlier(method: str) -> None:
    n, k = 300, 6
    rng = np.random.default_rng(5)
    honest = rng.standard_normal(k)
    contribs = [Contribution(i + 1, tuple(range(k)), tuple(float(x) for x in honest + 0.01 * rng.standard_normal(k)))
                for i in range(9)]
    contribs.append(Contribution(99, tuple(range(k)), tuple([1e3] * k)))  # a poisoned device
    clean = _explicit(contribs[:-1], n, shared=True)
    plain = reconstruct(contribs, n=n, round_seed=SEED, shared_seeds=True)
    robust = reconstruct(contribs, n=n, round_seed=SEED, shared_seeds=True,
                         robust=RobustConfig(method=method, trim_fraction=0.1))
    assert np.linalg.norm(plain - clean) > 10 * np.linalg.norm(clean)
    assert np.linalg.norm(robust - clean) < 0.05 * np.linalg.norm(clean)


@pytest.mark.parametrize("shared", [False, True])
def test_clipping_bounds_each_devices_derivative_vector(shared: bool) -> None:
    d = (30.0, -40.0)  # norm 50
    c = [Contribution(1, (0, 1), d)]
    clipped = reconstruct(c, n=128, round_seed=SEED, shared_seeds=shared, robust=RobustConfig(method="clip", clip=5.0))
    scaled = reconstruct([Contribution(1, (0, 1), (3.0, -4.0))], n=128, round_seed=SEED, shared_seeds=shared)
    np.testing.assert_allclose(clipped, scaled, rtol=1e-6)


def test_noise_stats_zero_spread_when_devices_agree_and_large_when_they_disagree() -> None:
    n, k = 200, 4
    same = [Contribution(i + 1, tuple(range(k)), (1.0, -2.0, 0.5, 3.0)) for i in range(10)]
    acc = Accumulator(n)
    accumulate(acc, same, round_seed=SEED, shared_seeds=True)
    assert acc.noise().ratio < 1e-9
    rng = np.random.default_rng(6)
    diff = [Contribution(i + 1, tuple(range(k)), tuple(float(x) for x in rng.standard_normal(k))) for i in range(10)]
    acc2 = Accumulator(n)
    accumulate(acc2, diff, round_seed=SEED, shared_seeds=False)
    assert acc2.noise().ratio > 0.3  # pure noise: the mean is about one standard error long
    single = Accumulator(n)
    accumulate(single, same[:1], round_seed=SEED)
    assert np.isnan(single.noise().ratio)


def _peak_bytes(num_devices: int, n: int, k: int, shared: bool) -> int:
    rng = np.random.default_rng(7)
    contribs = _contribs(num_devices, k, shared=shared, rng=rng)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        reconstruct(contribs, n=n, round_seed=SEED, shared_seeds=shared, threads=1)  # each thread adds O(n)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shared", [False, True])
def test_memory_is_independent_of_the_number_of_devices(shared: bool) -> None:
    n, k = 8192, 2
    small = _peak_bytes(10, n, k, shared)
    large = _peak_bytes(1000, n, k, shared)
    # O(n) buffers: accumulator, scratch vectors (and with shared seeds the K perturbations of
    # the round for their Gram matrix); 1000 devices x n floats would be 32 MB.
    bound = (2 * k + 16) * n * 4
    assert large < bound, (large, bound)
    assert large < small + 2 * 1024 * 1024, (small, large)


# --- the bit-domain fast path (fwdfleet/perturbation/sums.py, "lanes") ---


def _ragged(rng: np.random.Generator, num_devices: int, ks: list[int], scale: float = 1.0) -> list[Contribution]:
    """Devices with varying K and scattered, unsorted seed indices."""
    out = []
    for i in range(num_devices):
        k = ks[i % len(ks)]
        idx = tuple(int(x) for x in rng.choice(10_000, size=k, replace=False))
        out.append(Contribution(int(rng.integers(1, 2**32)) if i % 3 == 0 else i + 1, idx,
                                tuple(float(x) * scale for x in rng.standard_normal(k))))
    return out


@pytest.mark.parametrize(("n", "ks"), [(1, [1]), (31, [3]), (128, [8]), (129, [9, 16]), (1003, [16, 17, 2]),
                                       (5000, [40, 1, 8])])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_equals_reference_path(n: int, ks: list[int], dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(n)
    contribs = _ragged(rng, 37, ks)
    fast, ref = Accumulator(n, dtype), Accumulator(n, dtype)
    accumulate(fast, contribs, round_seed=SEED, fast=True, threads=2)
    accumulate(ref, contribs, round_seed=SEED, fast=False)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    scale = float(np.abs(ref.total).max())
    np.testing.assert_allclose(fast.total, ref.total, rtol=tol, atol=tol * scale)
    assert (fast.pairs, fast.units, fast.sum_w2) == (ref.pairs, ref.units, ref.sum_w2)
    assert fast.sum_w_sqnorm == pytest.approx(ref.sum_w_sqnorm, rel=1e-6)
    nf, nr = fast.noise(), ref.noise()
    assert nf.ratio == pytest.approx(nr.ratio, rel=1e-4)
    want = _explicit(sorted(contribs, key=lambda c: c.device_index), n, shared=False)
    np.testing.assert_allclose(fast.total / fast.pairs, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_fast_path_spans_several_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    import fwdfleet.perturbation.sums as sums

    monkeypatch.setattr(sums, "SEGMENT", 256)
    monkeypatch.setattr(sums, "TARGET_BLOCKS", 16)  # several generator calls per chunk too
    n = 1000  # segments of 256, 256, 256, 232
    contribs = _ragged(np.random.default_rng(11), 20, [16, 5])
    fast = reconstruct(contribs, n=n, round_seed=SEED, fast=True, threads=1, dtype=np.float64)
    ref = reconstruct(contribs, n=n, round_seed=SEED, fast=False, dtype=np.float64)
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)


def test_fast_path_is_bit_identical_for_any_thread_count_and_arrival_order() -> None:
    contribs = _ragged(np.random.default_rng(12), 70, [16, 16, 7])  # several chunks of CHUNK_DEVICES
    n = 3001
    runs = []
    for threads, order in [(1, None), (2, 0), (3, 1), (8, 2)]:
        shuffled = contribs[:]
        if order is not None:
            random.Random(order).shuffle(shuffled)
        acc = Accumulator(n)
        accumulate(acc, shuffled, round_seed=SEED, threads=threads)
        runs.append((acc.total.tobytes(), acc.sum_w_sqnorm, acc.noise().ratio))
    assert all(r == runs[0] for r in runs[1:])


def test_fast_path_clips_like_the_reference() -> None:
    contribs = _ragged(np.random.default_rng(13), 9, [16], scale=50.0)
    robust = RobustConfig(method="clip", clip=3.0)
    fast = reconstruct(contribs, n=700, round_seed=SEED, robust=robust, dtype=np.float64)
    ref = reconstruct(contribs, n=700, round_seed=SEED, robust=robust, fast=False, dtype=np.float64)
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)


def test_gaussian_ignores_the_fast_flag() -> None:
    contribs = _ragged(np.random.default_rng(14), 5, [4])
    a = reconstruct(contribs, n=300, round_seed=SEED, distribution="gaussian", fast=True)
    b = reconstruct(contribs, n=300, round_seed=SEED, distribution="gaussian", fast=False)
    assert a.tobytes() == b.tobytes()


def test_fast_path_memory_is_independent_of_the_number_of_devices() -> None:
    from fwdfleet.perturbation.sums import TARGET_BLOCKS

    def peak(num_devices: int) -> int:
        contribs = _contribs(num_devices, 16, shared=False, rng=np.random.default_rng(15))
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            reconstruct(contribs, n=20_000, round_seed=SEED, threads=2)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # Both runs keep two threads busy with full chunks; 640 x 20k floats would be 51 MB.
    small, large = peak(64), peak(640)
    assert large < small + 1024 * 1024, (small, large)
    assert large < 2 * TARGET_BLOCKS * 256 + 16 * 20_000 * 4, large  # per thread: one generator call
