"""Golden vectors pin the perturbation generator (spec in fwdfleet/perturbation/__init__.py).

A port (Kotlin, C, another numpy) checks itself against these values: the Philox4x32-10
known-answer vectors come from Random123's kat_vectors; the stream and sign vectors are this
project's spec.
"""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.bundle import TensorSpec
from fwdfleet.perturbation import PerturbationSpec, perturbation, philox4x32, random_words, split

# Random123 known-answer tests for philox4x32-10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# (round_seed, device, k) -> first four stream words and the first 40 Rademacher signs.
GOLDEN = [
    ((0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), "-+-+-+--+++-+------++-+++--++--+-+--+++-"),
    ((1, 2, 3), (0x24861DC7, 0x675011A7, 0x4E3B0F6A, 0x26DB49C4), "---+++---+---++++--++++-++-++-++---++-+-"),
    (
        (2**64 - 1, 2**32 - 1, 7),
        (0x0C026E9A, 0xD7DABF0B, 0xDEC2D9FA, 0xEE6460CF),
        "+-+--++-+---+--++-++++++++--++++--+-++++",
    ),
    ((20261123, 5, 63), (0xC955AA7A, 0xB5A7CA68, 0x98C0F856, 0x9D2A0E31), "+-+----++-+-+-+--+-+-+-+-++-++--+++-+--+"),
]

GAUSSIAN_1_2_3 = [-1.6221209, 0.8910637, -0.36287552, -1.2544217, -0.6636167, 0.96672636]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(np.array([counter], dtype=np.uint64), key)
    assert tuple(int(x) for x in out[0]) == expected


@pytest.mark.parametrize(("args", "words", "signs"), GOLDEN)
def test_golden_stream_and_signs(args, words, signs):
    seed, device, k = args
    assert tuple(int(w) for w in random_words(seed, device, k, 4)) == words
    z = perturbation(seed, device, k, 40)
    assert z.dtype == np.float32
    assert "".join("+" if v > 0 else "-" for v in z) == signs


def test_gaussian_golden_within_tolerance():
    z = perturbation(1, 2, 3, 6, "gaussian")
    np.testing.assert_allclose(z, GAUSSIAN_1_2_3, rtol=1e-6)


def test_stream_is_seekable_and_prefix_stable():
    full = random_words(99, 1, 2, 37)
    assert np.array_equal(random_words(99, 1, 2, 10, start_word=27), full[27:])
    # a longer vector starts with the shorter one: n does not change earlier elements
    assert np.array_equal(perturbation(99, 1, 2, 1000)[:77], perturbation(99, 1, 2, 77))


def test_different_coordinates_give_different_vectors():
    base = perturbation(5, 0, 0, 4096)
    for other in (perturbation(6, 0, 0, 4096), perturbation(5, 1, 0, 4096), perturbation(5, 0, 1, 4096)):
        agreement = float(np.mean(base == other))
        assert 0.4 < agreement < 0.6


def test_rademacher_statistics():
    z = perturbation(12345, 3, 9, 200_000)
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 0.01
    g = perturbation(12345, 3, 9, 200_000, "gaussian")
    assert abs(float(g.mean())) < 0.01 and abs(float(g.std()) - 1) < 0.01


def test_split_and_spec():
    specs = [TensorSpec("a", (2, 3)), TensorSpec("b", (4,))]
    spec = PerturbationSpec(round_seed=7, device=1, n=10)
    z = spec.z(3)
    parts = split(z, specs)
    assert parts["a"].shape == (2, 3) and parts["b"].shape == (4,)
    assert np.array_equal(np.concatenate([parts["a"].ravel(), parts["b"]]), z)
    seen = [(k, v.copy()) for k, v in spec.iter_z([0, 3])]
    assert np.array_equal(seen[1][1], z)
    with pytest.raises(ValueError, match="round_seed"):
        PerturbationSpec(round_seed=-1, device=0, n=3)
    with pytest.raises(ValueError, match="device"):
        perturbation(0, 2**32, 0, 3)
    with pytest.raises(ValueError, match="distribution"):
        perturbation(0, 0, 0, 3, "uniform")  # type: ignore[arg-type]
