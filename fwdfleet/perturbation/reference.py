"""The perturbation spec written plainly: the test oracle of :mod:`fwdfleet.perturbation`.

Each function follows the spec in :mod:`fwdfleet.perturbation`'s docstring line by line, one
Philox block and one element at a time in Python integers and floats, with no vectorisation,
no in-place tricks and no tables. It is slow (use it on small vectors); its worth is that it is
obviously the spec. ``tests/test_perturbation_fast.py`` holds the package's implementation to it
bit for bit (the integer stream, Rademacher signs, the sums' exact values) and a port can read it
as a second statement of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_block(counter: Sequence[int], key: Sequence[int], rounds: int = 10) -> tuple[int, int, int, int]:
    """One Philox4x32 block (Salmon et al., SC'11; Random123's ``philox4x32_R``)."""
    c0, c1, c2, c3 = (int(x) & MASK32 for x in counter)
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        p0, p1 = PHILOX_M[0] * c0, PHILOX_M[1] * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def stream_word(round_seed: int, device: int, k: int, w: int) -> int:
    """Word ``w`` of the stream of ``(round_seed, device, k)``: word ``w % 4`` of block ``w // 4``,
    whose counter is ``(b & 0xFFFFFFFF, b >> 32, k, device)`` under the key of ``round_seed``."""
    b = w // 4
    key = (round_seed & MASK32, (round_seed >> 32) & MASK32)
    return philox4x32_block((b & MASK32, b >> 32, k, device), key)[w % 4]


def rademacher(round_seed: int, device: int, k: int, n: int) -> list[int]:
    """Element ``j`` is ``+1`` if bit ``j mod 32`` of word ``j // 32`` is 0, else ``-1``."""
    words = [stream_word(round_seed, device, k, w) for w in range((n + 31) // 32)]
    return [-1 if (words[j // 32] >> (j % 32)) & 1 else 1 for j in range(n)]


def gaussian(round_seed: int, device: int, k: int, n: int) -> npt.NDArray[np.float32]:
    """Element ``j``: Box-Muller on words ``2j`` and ``2j + 1``, in float64, rounded to float32."""
    out = np.empty(n, dtype=np.float32)
    for j in range(n):
        u1 = (stream_word(round_seed, device, k, 2 * j) + 1) / 2.0**32
        u2 = stream_word(round_seed, device, k, 2 * j + 1) / 2.0**32
        out[j] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return out


def weighted_rademacher_sum(round_seed: int, terms: Sequence[tuple[int, int, float]], n: int) -> list[float]:
    """``sum_i w_i z(round_seed, device_i, k_i)`` for ``terms = [(device_i, k_i, w_i), ...]``, each
    element the exactly rounded float64 sum (``math.fsum``): the value every fast path approximates."""
    columns = [rademacher(round_seed, device, k, n) for device, k, _ in terms]
    weights = [float(w) for _, _, w in terms]
    return [math.fsum(w * col[j] for w, col in zip(weights, columns, strict=True)) for j in range(n)]
