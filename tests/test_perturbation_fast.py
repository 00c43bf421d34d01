"""The package's implementation against its oracle, ``fwdfleet.perturbation.reference`` (the spec
written plainly): the batched counter layout, the sign tables, the bit lanes and both ways of
summing ``d_k z_k``, bit for bit where the spec is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fwdfleet.perturbation import (
    BYTE_SIGNS,
    bit_lanes,
    byte_sign_table,
    expand_rademacher,
    from_lane_order,
    lane_table,
    perturbation,
    philox4x32,
    rademacher_words,
    random_words,
    stream_words,
    tail_positions,
)
from fwdfleet.perturbation import reference as oracle
from fwdfleet.perturbation.sums import WeightedSeeds, add_weighted_perturbations

SEEDS = (0, 1, 2**64 - 1, 20261123, 0xDEADBEEF12345678)
COORDS = [(0, 0), (2**32 - 1, 7), (5, 63), (5, 64), (123456, 2**32 - 1)]


def test_philox_equals_the_oracle_on_random_counters_and_keys() -> None:
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    for key in [(0, 0), (2**32 - 1, 2**32 - 1), (int(rng.integers(2**32)), int(rng.integers(2**32)))]:
        got = philox4x32(counters, key)
        want = [oracle.philox4x32_block(c.tolist(), key) for c in counters]
        assert got.tolist() == [list(w) for w in want]


@pytest.mark.parametrize(("n_words", "start"), [(1, 0), (7, 5), (13, 3), (9, 2**32 * 4 - 3)])
def test_stream_words_equal_the_oracle_counter_layout(n_words: int, start: int) -> None:
    """Many (device, k) streams in one call, from any word (block numbers past 2**32 too)."""
    for seed in SEEDS:
        rows = stream_words(seed, COORDS, n_words, start)
        assert rows.shape == (len(COORDS), n_words) and rows.dtype == np.uint32
        for row, (device, k) in zip(rows, COORDS, strict=True):
            want = [oracle.stream_word(seed, device, k, start + w) for w in range(n_words)]
            assert row.tolist() == want
            assert np.array_equal(random_words(seed, device, k, n_words, start_word=start), row)


def test_stream_words_reject_out_of_range_coordinates() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        stream_words(1, [(2**32, 0)], 4)
    with pytest.raises(ValueError, match="round_seed"):
        stream_words(-1, [(0, 0)], 4)
    assert stream_words(1, [], 4).shape == (0, 4)


@pytest.mark.parametrize("n", [1, 31, 33, 257, 1000])
def test_rademacher_and_gaussian_vectors_equal_the_oracle(n: int) -> None:
    for seed, (device, k) in zip(SEEDS, COORDS, strict=True):
        assert perturbation(seed, device, k, n).astype(int).tolist() == oracle.rademacher(seed, device, k, n)
    g = perturbation(1, 2, 3, min(n, 64), "gaussian")
    np.testing.assert_allclose(g, oracle.gaussian(1, 2, 3, min(n, 64)), rtol=1e-6)  # the spec's tolerance


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_sign_table_expands_exactly_scale_times_z(dtype: type[np.floating]) -> None:
    n, scale = 1_000, 0.0123
    words = rademacher_words(5, 1, 2, n)
    z = np.array(oracle.rademacher(5, 1, 2, n), dtype=np.float64)
    want = (z * dtype(scale)).astype(dtype)
    out = np.empty(n, dtype=dtype)
    for start, stop in ((17, 900), (16, 904), (3, 6), (0, n), (999, 1_000), (5, 5)):  # partial and whole bytes
        got = expand_rademacher(words, start, stop, out, scale)
        assert got.dtype == dtype and got.tobytes() == want[start:stop].tobytes()
    table = byte_sign_table(scale, dtype)
    assert not table.flags.writeable and table.shape == (256, 8)
    assert np.array_equal(table, (BYTE_SIGNS * scale).astype(dtype))


@pytest.mark.parametrize("width", [8, 16])
def test_bit_lanes_gather_each_elements_bits(width: int) -> None:
    n, n_words = 250, 8  # 256 elements: the last 6 are tail
    coords = [(3, k) for k in range(width)]
    words = np.ascontiguousarray(stream_words(77, coords, n_words))
    lanes = bit_lanes(words, width).astype(np.int64)  # in place: words is now transposed
    assert lanes.shape == (width, 32 * n_words // width)
    bits = np.array([[v < 0 for v in oracle.rademacher(77, d, k, 32 * n_words)] for d, k in coords], dtype=np.int64)
    expected = (bits << np.arange(width)[:, None]).sum(axis=0)  # lane value of every element
    got = from_lane_order(lanes.astype(np.float64), 32 * n_words, width).astype(np.int64)
    assert np.array_equal(got, expected)
    # and the tail positions are exactly the elements past n
    mask = np.zeros(32 * n_words, dtype=bool)
    mask[tail_positions(n_words, n, width)] = True
    order = from_lane_order(np.arange(32 * n_words, dtype=np.float64), 32 * n_words, width).astype(np.int64)
    assert np.array_equal(np.sort(order[n:]), np.flatnonzero(mask))


@pytest.mark.parametrize("width", [8, 16])
def test_lane_table_is_every_signed_sum(width: int) -> None:
    c = np.random.default_rng(0).standard_normal(width - 3)  # zero-padded to width
    v = np.arange(1 << width)
    signs = 1 - 2 * ((v[:, None] >> np.arange(width - 3)[None, :]) & 1)
    exact = np.array([math.fsum(float(x) for x in row) for row in signs * c])
    np.testing.assert_allclose(lane_table(c, width, np.float64), exact, rtol=1e-14, atol=1e-14 * np.abs(c).sum())
    t32 = lane_table(c, width, np.float32)
    np.testing.assert_allclose(t32, exact, rtol=2e-7, atol=2e-7 * np.abs(c).sum())


def _terms(rng: np.random.Generator, ks: list[int]) -> list[WeightedSeeds]:
    return [WeightedSeeds(int(rng.integers(0, 2**32)) if i % 2 else i,
                          tuple(int(x) for x in rng.choice(500, k, replace=False)), rng.standard_normal(k))
            for i, k in enumerate(ks)]


@pytest.mark.parametrize("method", ["pairs", "lanes"])
@pytest.mark.parametrize("n", [1, 31, 129, 700])
def test_both_sums_equal_the_oracle(method: str, n: int) -> None:
    terms = _terms(np.random.default_rng(n), [3, 16, 17, 1, 0])
    seed = 0xDEADBEEF12345
    exact = np.array(oracle.weighted_rademacher_sum(
        seed, [(t.device, k, w) for t in terms for k, w in zip(t.indices, t.weights.tolist(), strict=True)], n))
    seen: list[tuple[int, float]] = []
    got = add_weighted_perturbations(np.zeros(n), terms, round_seed=seed, method=method,  # type: ignore[arg-type]
                                     on_term=lambda pairs, sq: seen.append((pairs, sq)), threads=2)
    total_weight = sum(float(np.abs(t.weights).sum()) for t in terms)
    np.testing.assert_allclose(got, exact, rtol=1e-13, atol=1e-13 * total_weight)
    assert [p for p, _ in seen] == [3, 16, 17, 1]  # in order; the empty term is not reported
    for (_, sq), t in zip(seen, terms, strict=False):
        pairs = [(t.device, k, w) for k, w in zip(t.indices, t.weights.tolist(), strict=True)]
        g = np.array(oracle.weighted_rademacher_sum(seed, pairs, n))
        assert sq == pytest.approx(float(g @ g), rel=1e-12)


def test_pairs_sum_adds_each_exact_product_in_order() -> None:
    """The device's update: per element ``out += float32(w_k) * z_k`` in k order, the formula."""
    n, seed = 333, 77
    out = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    term = WeightedSeeds(3, (1, 4, 9), np.array([0.5, -2.25, 1e-3]) * -0.1)
    want = out.copy()
    for k, w in zip(term.indices, term.weights, strict=True):
        want += np.array(oracle.rademacher(seed, 3, k, n), dtype=np.float32) * np.float32(w)
    add_weighted_perturbations(out, [term], round_seed=seed, method="pairs", buffer=np.empty(50, np.float32))
    assert out.tobytes() == want.tobytes()


def test_sum_arguments_are_checked() -> None:
    term = WeightedSeeds(0, (1,), np.ones(1))
    with pytest.raises(ValueError, match="Gaussian"):
        add_weighted_perturbations(np.zeros(4), [term], round_seed=1, distribution="gaussian", method="lanes")
    with pytest.raises(ValueError, match="float32 or float64"):
        add_weighted_perturbations(np.zeros(4, np.int64), [term], round_seed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 weights"):
        WeightedSeeds(0, (1,), np.ones(2))
    with pytest.raises(ValueError, match="threads"):
        add_weighted_perturbations(np.zeros(4), [term], round_seed=1, method="lanes", threads=0)


def test_argument_checks_name_the_problem() -> None:
    with pytest.raises(ValueError, match="width"):
        bit_lanes(np.zeros((4, 2), dtype=np.uint32), 4)
    with pytest.raises(ValueError, match="W even"):
        bit_lanes(np.zeros((8, 3), dtype=np.uint32), 8)
    with pytest.raises(ValueError, match="at most 8"):
        lane_table(np.ones(9), 8, np.float32)
    with pytest.raises(ValueError, match="out must be"):
        lane_table(np.ones(2), 8, np.float32, out=np.empty(256, dtype=np.float64))
    with pytest.raises(ValueError, match="do not cover"):
        tail_positions(2, 100, 8)
