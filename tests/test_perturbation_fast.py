"""The batched generator and bit lanes agree with the one generator, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.perturbation import perturbation, random_words
from fwdfleet.perturbation_fast import (
    bit_lanes,
    from_lane_order,
    sign_table,
    tail_positions,
    words_for_coords,
)


@pytest.mark.parametrize(("n_words", "start"), [(1, 0), (7, 5), (40, 3), (128, 0)])
def test_batched_words_equal_random_words(n_words: int, start: int) -> None:
    coords = [(0, 0), (2**32 - 1, 7), (5, 63), (5, 64), (123456, 2**32 - 1)]
    for seed in (0, 2**64 - 1, 20261123):
        rows = words_for_coords(seed, coords, n_words, start)
        assert rows.shape == (len(coords), n_words) and rows.dtype == np.uint32
        for row, (device, k) in zip(rows, coords, strict=True):
            assert np.array_equal(row, random_words(seed, device, k, n_words, start_word=start))


def test_batched_words_reject_out_of_range_coordinates() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        words_for_coords(1, [(2**32, 0)], 4)
    with pytest.raises(ValueError, match="round_seed"):
        words_for_coords(-1, [(0, 0)], 4)
    assert words_for_coords(1, [], 4).shape == (0, 4)


@pytest.mark.parametrize("width", [8, 16])
def test_bit_lanes_gather_each_elements_bits(width: int) -> None:
    n, n_words = 250, 8  # 256 elements: the last 6 are tail
    coords = [(3, k) for k in range(width)]
    words = np.ascontiguousarray(words_for_coords(77, coords, n_words))
    lanes = bit_lanes(words, width).astype(np.int64)  # in place: words is now transposed
    assert lanes.shape == (width, 32 * n_words // width)
    signs = np.stack([perturbation(77, d, k, 32 * n_words) for d, k in coords])  # (width, elements)
    bits = (signs < 0).astype(np.int64)
    expected = (bits << np.arange(width)[:, None]).sum(axis=0)  # lane value of every element
    got = from_lane_order(lanes.astype(np.float64), 32 * n_words, width).astype(np.int64)
    assert np.array_equal(got, expected)
    # and the tail positions are exactly the elements past n
    mask = np.zeros(32 * n_words, dtype=bool)
    mask[tail_positions(n_words, n, width)] = True
    order = from_lane_order(np.arange(32 * n_words, dtype=np.float64), 32 * n_words, width).astype(np.int64)
    assert np.array_equal(np.sort(order[n:]), np.flatnonzero(mask))


@pytest.mark.parametrize("width", [8, 16])
def test_sign_table_is_every_signed_sum(width: int) -> None:
    c = np.random.default_rng(0).standard_normal(width - 3)  # zero-padded to width
    table = sign_table(c, width, np.float64)
    v = np.arange(1 << width)
    signs = 1.0 - 2.0 * ((v[:, None] >> np.arange(width - 3)[None, :]) & 1)
    np.testing.assert_allclose(table, signs @ c, rtol=1e-12, atol=1e-12)
    t32 = sign_table(c, width, np.float32)
    np.testing.assert_allclose(t32, signs @ c, rtol=2e-7, atol=2e-7 * np.abs(c).sum())


def test_argument_checks_name_the_problem() -> None:
    with pytest.raises(ValueError, match="width"):
        bit_lanes(np.zeros((4, 2), dtype=np.uint32), 4)
    with pytest.raises(ValueError, match="W even"):
        bit_lanes(np.zeros((8, 3), dtype=np.uint32), 8)
    with pytest.raises(ValueError, match="at most 8"):
        sign_table(np.ones(9), 8, np.float32)
    with pytest.raises(ValueError, match="out must be"):
        sign_table(np.ones(2), 8, np.float32, out=np.empty(256, dtype=np.float64))
    with pytest.raises(ValueError, match="do not cover"):
        tail_positions(2, 100, 8)
