"""Many Rademacher perturbations at once, as bit lanes: the fast path for summing ``d_k z_k``.

Same stream as :mod:`fwdfleet.perturbation` (the one generator: this module only batches
the counters of many ``(device, k)`` pairs into one call of its
:func:`~fwdfleet.perturbation.philox4x32`; ``tests/test_reconstruct.py`` pins it to
:func:`~fwdfleet.perturbation.random_words` and :func:`~fwdfleet.perturbation.perturbation`).

A Rademacher element is one bit (``1`` means ``-1``). A weighted sum of ``R`` perturbations,
``sum_i d_i z_i``, takes at each element one of ``2**R`` values: ``T[v] = sum_i d_i (1 - 2 v_i)``
where ``v_i`` is the element's bit in perturbation ``i``. So instead of ``R`` float
multiply-adds per element it costs one table look-up, once the ``R`` bits of every element are
gathered into one ``R``-bit integer, its *lane*. :func:`bit_lanes` gathers them with a bit-matrix
transpose done in place on the words (``log2 R`` delta swaps, no per-bit unpacking).

Lane layout
-----------
The transpose leaves the lanes of ``R`` rows of ``W`` words as an ``(R, Q)`` array,
``Q = 32 W / R``, whose entry ``(r, q)`` is element ``R q + r`` (all elements are there,
permuted). Sums can stay in that layout; :func:`from_lane_order` puts a vector back in element
order. Elements past ``n`` (the tail of the last word) are real stream bits: callers zero their
positions (:func:`tail_positions`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fwdfleet.perturbation import philox4x32

LANE_WIDTHS = (8, 16)
_LANE_DTYPES: dict[int, type[np.unsignedinteger]] = {8: np.uint8, 16: np.uint16}
# delta swap j: mask of the bits whose position has bit j clear, repeated over the word
_SWAP_MASKS = {8: np.uint64(0x00FF00FF00FF00FF), 4: np.uint64(0x0F0F0F0F0F0F0F0F),
               2: np.uint64(0x3333333333333333), 1: np.uint64(0x5555555555555555)}
_MASK32 = np.uint64(0xFFFFFFFF)

U32Array = npt.NDArray[np.uint32]
LaneArray = npt.NDArray[np.unsignedinteger]
FloatArray = npt.NDArray[np.floating]


def words_for_coords(round_seed: int, coords: Sequence[tuple[int, int]], n_words: int,
                     start_word: int = 0) -> U32Array:
    """Stream words ``start_word ..`` of every ``(device, k)`` in ``coords``: ``(len(coords), n_words)``.

    Row ``i`` equals ``random_words(round_seed, *coords[i], n_words, start_word)``; all rows
    share the Philox key (the round seed), so one call covers them all.
    """
    if not 0 <= round_seed < 1 << 64:
        raise ValueError(f"round_seed must be an unsigned 64-bit integer, got {round_seed}")
    m = len(coords)
    if n_words <= 0 or m == 0:
        return np.zeros((m, max(n_words, 0)), dtype=np.uint32)
    dk = np.asarray(coords, dtype=np.int64).reshape(m, 2)
    if dk.min() < 0 or dk.max() >= 1 << 32:
        raise ValueError("device and k must be unsigned 32-bit integers")
    first_block, last_block = start_word // 4, (start_word + n_words - 1) // 4
    blocks = np.arange(first_block, last_block + 1, dtype=np.uint64)
    nb = blocks.size
    counters = np.empty((m, nb, 4), dtype=np.uint64)
    counters[:, :, 0] = blocks & _MASK32
    counters[:, :, 1] = blocks >> np.uint64(32)
    counters[:, :, 2] = dk[:, 1:2].astype(np.uint64)
    counters[:, :, 3] = dk[:, 0:1].astype(np.uint64)
    words = philox4x32(counters.reshape(m * nb, 4), (round_seed & 0xFFFFFFFF, round_seed >> 32))
    offset = start_word - 4 * first_block
    return words.reshape(m, 4 * nb)[:, offset : offset + n_words]


def bit_lanes(words: U32Array, width: int) -> LaneArray:
    """Transpose ``(..., width, W)`` words in place into lanes ``(..., width, 32 W / width)``.

    Afterwards lane ``(r, q)`` holds, in bit ``i``, the stream bit of row ``i`` for element
    ``width * q + r``. ``words`` must be C-contiguous uint32 with ``W`` even (two words are
    swapped at once as one uint64: no swap moves a bit across a word boundary); the result is
    a view of it.
    """
    if width not in LANE_WIDTHS:
        raise ValueError(f"width must be one of {LANE_WIDTHS}, got {width}")
    if (words.dtype != np.uint32 or not words.flags.c_contiguous or words.ndim < 2
            or words.shape[-2] != width or words.shape[-1] % 2):
        raise ValueError(f"words must be a C-contiguous uint32 array of shape (..., {width}, W), W even")
    if sys.byteorder != "little":
        raise RuntimeError("bit lanes assume a little-endian machine")
    lead, n_pairs = words.shape[:-2], words.shape[-1] // 2
    pairs = words.view(np.uint64)
    tmp = np.empty((*lead, width // 2, n_pairs), dtype=np.uint64)
    j = width // 2
    while j:
        # rows i and i + j (bit j of i clear) exchange the bits at positions with bit j set / clear
        x = pairs.reshape(*lead, width // (2 * j), 2, j, n_pairs)
        a, b = x[..., 0, :, :], x[..., 1, :, :]
        t = tmp.reshape(*lead, width // (2 * j), j, n_pairs)
        shift = np.uint64(j)
        np.right_shift(a, shift, out=t)
        t ^= b
        t &= _SWAP_MASKS[j]
        b ^= t
        t <<= shift
        a ^= t
        j //= 2
    return words.view(_LANE_DTYPES[width])


def from_lane_order(lanes_major: FloatArray, n: int, width: int) -> FloatArray:
    """Element-order copy of a vector kept in lane layout (``(width, Q)`` or flat ``width * Q``)."""
    flat = np.asarray(lanes_major).reshape(width, -1)
    if flat.size < n:
        raise ValueError(f"lane-layout vector holds {flat.size} values, fewer than n={n}")
    out: FloatArray = np.ascontiguousarray(flat.T).reshape(-1)[:n]
    return out


def tail_positions(n_words: int, n: int, width: int) -> npt.NDArray[np.intp]:
    """Flat lane-layout positions of elements ``n .. 32 n_words - 1`` (past the vector's end)."""
    if not 0 <= 32 * n_words - n < 128:
        raise ValueError(f"{n_words} words do not cover the {n} elements (plus < 128: whole Philox blocks)")
    q_count = 32 * n_words // width
    elems = np.arange(n, 32 * n_words, dtype=np.intp)
    pos: npt.NDArray[np.intp] = (elems % width) * q_count + elems // width
    return pos


def sign_table(coefficients: npt.NDArray[np.float64], width: int, dtype: type[np.floating],
               out: FloatArray | None = None) -> FloatArray:
    """``T[v] = sum_i c_i (1 - 2 bit_i(v))`` for every ``width``-bit lane value ``v`` (``c`` zero-padded).

    The sums over each byte of the lane are exact in float64 and rounded once to ``dtype``; a
    16-bit table adds its two byte tables in ``dtype`` (``v = hi * 256 + lo``): at most two
    roundings per entry, against ``K`` for a running float32 sum of ``K`` products.
    """
    if width not in LANE_WIDTHS:
        raise ValueError(f"width must be one of {LANE_WIDTHS}, got {width}")
    if coefficients.size > width:
        raise ValueError(f"at most {width} coefficients per lane table, got {coefficients.size}")
    if out is None:
        out = np.empty(1 << width, dtype=dtype)
    elif out.shape != (1 << width,) or out.dtype != dtype:
        raise ValueError(f"out must be a {np.dtype(dtype).name} array of shape ({1 << width},)")
    c = coefficients
    if c.size < width:
        c = np.zeros(width, dtype=np.float64)
        c[: coefficients.size] = coefficients
    byte_tab = (_BYTE_SIGNS @ c.reshape(-1, 8).T).astype(dtype)  # (256, width // 8)
    if width == 8:
        out[:] = byte_tab[:, 0]
    else:
        np.add(byte_tab[:, 1, None], byte_tab[None, :, 0], out=out.reshape(256, 256))
    return out


_BYTE_SIGNS = 1.0 - 2.0 * ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float64)
