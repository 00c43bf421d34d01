"""Seed-regenerated perturbations: the one generator both the device and the aggregator use.

A perturbation ``z`` for ``(round_seed, device, k)`` over ``n`` trainable scalars is a pure
function of those four numbers. The aggregator never receives ``z``: it regenerates it from
the seed, bit for bit, on whatever machine it runs. The spec is small so that a Kotlin or C
port can reproduce it; ``tests/test_perturbation.py`` pins it with golden vectors.

Spec (version 1)
----------------
* Block function: **Philox4x32-10** (Salmon et al., SC'11, as in Random123): 10 rounds,
  multipliers ``0xD2511F53``, ``0xCD9E8D57``, Weyl key increments ``0x9E3779B9``,
  ``0xBB67AE85``.
* Key: ``(round_seed & 0xFFFFFFFF, (round_seed >> 32) & 0xFFFFFFFF)``; ``round_seed`` is an
  unsigned 64-bit integer.
* Counter of block ``b`` (``b = 0, 1, ...``): ``(b & 0xFFFFFFFF, b >> 32, k, device)``
  with ``k`` and ``device`` unsigned 32-bit integers. Shared-seed rounds use ``device = 0``.
* The stream is the blocks' output words in order, ``x0, x1, x2, x3`` of block 0, then
  block 1, ...; word ``w`` of the stream feeds elements ``32 w .. 32 w + 31``.
* **Rademacher** (default): element ``j`` is ``+1`` if bit ``j mod 32`` (least significant
  first) of word ``j // 32`` is 0, else ``-1``. Exact on every machine.
* **Gaussian**: element ``j`` uses the stream's words ``2j`` and ``2j+1``:
  ``u1 = (w[2j] + 1) / 2**32`` (in ``(0, 1]``), ``u2 = w[2j+1] / 2**32``,
  ``z = sqrt(-2 ln u1) * cos(2 pi u2)``, computed in float64 then rounded to float32. ``log``
  and ``cos`` may differ in the last ulp between math libraries, so a port matches within
  ``1e-6`` relative (float32 rounding hides almost all of it); the integer stream is exact.
* The flat vector covers the trainable tensors in the manifest's canonical order, each
  flattened in C order (:func:`split`).

This package
------------
* here: the generator as both sides run it. The counter layout is written once
  (:func:`stream_words`, many ``(device, k)`` streams in one Philox call; :func:`random_words` is
  its one-stream case), Rademacher signs are expanded from a byte-to-eight-values table
  (:func:`byte_sign_table`) and, for sums over many perturbations, gathered into bit lanes
  (:func:`bit_lanes`, :func:`lane_table`);
* :mod:`fwdfleet.perturbation.sums`: the one sum of ``d_k z_k``, for the device's update and the
  aggregator's reconstruction;
* :mod:`fwdfleet.perturbation.reference`: the spec above written plainly, element by element in
  Python integers: the oracle the tests hold this implementation to (and a port may read).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import TensorSpec

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("rademacher", "gaussian")
SPEC_VERSION = 1

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_U32 = 1 << 32
CHUNK_ELEMENTS = 1 << 16  # z values expanded at a time (256 KB of float32)
WORD_BLOCKS = 1 << 14  # Philox blocks generated at a time: bounds the uint64 temporaries to ~1.5 MB

U32Array = npt.NDArray[np.uint32]
F32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.floating]
LaneArray = npt.NDArray[np.unsignedinteger]
FArray = TypeVar("FArray", npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.floating])


def philox4x32(counters: npt.NDArray[np.uint64], key: tuple[int, int], rounds: int = 10) -> U32Array:
    """Philox4x32 on many counters at once.

    ``counters`` has shape ``(n, 4)`` holding 32-bit values (in uint64 storage for the
    multiplications); returns ``(n, 4)`` uint32 output words.
    """
    # In place on preallocated buffers (no temporaries per operation): twice as fast as the
    # expression form on 5k blocks, bit for bit the same (the golden vectors pin it).
    c0, c1, c2, c3 = (np.array(counters[:, i], dtype=np.uint64) for i in range(4))  # contiguous copies
    p0, p1, t = np.empty_like(c0), np.empty_like(c0), np.empty_like(c0)
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & 0xFFFFFFFF
            k1 = (k1 + _W1) & 0xFFFFFFFF
        np.multiply(c0, _M0, out=p0)
        np.multiply(c2, _M1, out=p1)
        np.right_shift(p1, _S32, out=t)  # c0' = hi(M1 c2) ^ c1 ^ k0
        t ^= c1
        t ^= np.uint64(k0)
        np.bitwise_and(p1, _MASK32, out=c1)  # c1' = lo(M1 c2)
        np.right_shift(p0, _S32, out=c2)  # c2' = hi(M0 c0) ^ c3 ^ k1
        c2 ^= c3
        c2 ^= np.uint64(k1)
        np.bitwise_and(p0, _MASK32, out=c3)  # c3' = lo(M0 c0)
        c0, t = t, c0
    out = np.empty((c0.size, 4), dtype=np.uint32)
    for i, c in enumerate((c0, c1, c2, c3)):
        out[:, i] = c
    return out


def _check_u32(name: str, value: int) -> int:
    if not 0 <= value < _U32:
        raise ValueError(f"{name} must be an unsigned 32-bit integer, got {value}")
    return value


def _check_seed(round_seed: int) -> int:
    if not 0 <= round_seed < 1 << 64:
        raise ValueError(f"round_seed must be an unsigned 64-bit integer, got {round_seed}")
    return round_seed


def stream_words(round_seed: int, coords: Sequence[tuple[int, int]], n_words: int, start_word: int = 0) -> U32Array:
    """Words ``start_word .. start_word + n_words - 1`` of the stream of every ``(device, k)`` in
    ``coords``, as a ``(len(coords), n_words)`` array: the spec's counter layout, the only place it
    is written. All streams of a round share the Philox key, so one call covers them all."""
    _check_seed(round_seed)
    m = len(coords)
    if n_words <= 0 or m == 0:
        return np.zeros((m, max(n_words, 0)), dtype=np.uint32)
    dk = np.asarray(coords, dtype=np.int64).reshape(m, 2)
    if dk.min() < 0 or dk.max() >= _U32:
        raise ValueError("device and k must be unsigned 32-bit integers")
    first_block, last_block = start_word // 4, (start_word + n_words - 1) // 4
    blocks = np.arange(first_block, last_block + 1, dtype=np.uint64)
    nb = blocks.size
    counters = np.empty((m, nb, 4), dtype=np.uint64)
    counters[:, :, 0] = blocks & _MASK32  # (block low, block high, k, device)
    counters[:, :, 1] = blocks >> _S32
    counters[:, :, 2] = dk[:, 1:2].astype(np.uint64)
    counters[:, :, 3] = dk[:, 0:1].astype(np.uint64)
    words = philox4x32(counters.reshape(m * nb, 4), (round_seed & 0xFFFFFFFF, round_seed >> 32))
    offset = start_word - 4 * first_block
    return words.reshape(m, 4 * nb)[:, offset : offset + n_words]


def random_words(round_seed: int, device: int, k: int, n_words: int, start_word: int = 0) -> U32Array:
    """Words ``start_word .. start_word + n_words - 1`` of the stream for ``(round_seed, device, k)``."""
    _check_seed(round_seed)
    _check_u32("device", device)
    _check_u32("k", k)
    words: U32Array = stream_words(round_seed, [(device, k)], n_words, start_word)[0]
    return words


def perturbation(
    round_seed: int,
    device: int,
    k: int,
    n: int,
    distribution: Distribution = "rademacher",
    *,
    out: F32Array | None = None,
) -> F32Array:
    """The flat perturbation ``z`` of length ``n`` (float32) for ``(round_seed, device, k)``.

    Generated :data:`CHUNK_ELEMENTS` at a time (:func:`perturbation_slice`), so the generator's
    temporaries stay chunk-sized whatever ``n`` is."""
    _check_seed(round_seed)
    _check_u32("device", device)
    _check_u32("k", k)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.shape != (n,) or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape ({n},)")
    for start, stop in chunk_ranges(n, CHUNK_ELEMENTS):
        perturbation_slice(round_seed, device, k, start, stop, distribution, out[start:stop])
    return out


# ------------------------------------------------------------------- chunked regeneration
# Elements start .. stop - 1 of a perturbation, bit for bit the same as the whole vector's (the
# spec is per element): the estimator forms perturbed points and updates chunk by chunk, so z
# never has to exist as a whole vector and the generator's temporaries stay chunk-sized.


def rademacher_words(round_seed: int, device: int, k: int, n: int, out: U32Array | None = None) -> U32Array:
    """The ``ceil(n / 32)`` stream words holding a Rademacher ``z``'s signs (``n / 8`` bytes),
    generated :data:`WORD_BLOCKS` Philox blocks at a time."""
    n_words = (n + 31) // 32
    words = np.empty(n_words, dtype=np.uint32) if out is None else out
    if words.shape != (n_words,) or words.dtype != np.uint32:
        raise ValueError(f"out must be a uint32 array of shape ({n_words},)")
    step = 4 * WORD_BLOCKS
    for start in range(0, n_words, step):
        stop = min(n_words, start + step)
        words[start:stop] = random_words(round_seed, device, k, stop - start, start_word=start)
    return words


def sign_bits(words: U32Array, start: int, stop: int) -> npt.NDArray[np.bool_]:
    """For elements ``start .. stop - 1`` of a Rademacher ``z``: True where ``z`` is -1."""
    if stop <= start:
        return np.zeros(0, dtype=np.bool_)
    first, last = start // 32, (stop - 1) // 32
    bits = np.unpackbits(words[first : last + 1].astype("<u4", copy=False).view(np.uint8), bitorder="little")
    return bits[start - 32 * first : stop - 32 * first].view(np.bool_)


BYTE_SIGNS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").view(np.bool_), -1.0, 1.0)
"""``(256, 8)`` float64: row ``b`` is the eight values of ``z`` whose sign bits are the stream byte
``b`` (bit ``j`` for element ``j``; a set bit is -1). Both sign tables below are made from it."""
BYTE_SIGNS.flags.writeable = False


def byte_sign_table(scale: float, dtype: type[np.floating] = np.float32) -> FloatArray:
    """``(256, 8)``: ``scale * z`` for the eight elements of each stream byte (``BYTE_SIGNS`` scaled,
    exactly ``+-scale`` rounded to ``dtype``). Read-only, cached per ``(scale, dtype)``."""
    return _byte_sign_table(float(scale), np.dtype(dtype).name)


@functools.lru_cache(maxsize=16)
def _byte_sign_table(scale: float, dtype: str) -> FloatArray:
    table: FloatArray = (BYTE_SIGNS * scale).astype(dtype)
    table.flags.writeable = False
    return table


def expand_rademacher(words: U32Array, start: int, stop: int, out: FArray, scale: float = 1.0) -> FArray:
    """``scale * z`` for elements ``start .. stop - 1`` of the Rademacher ``z`` whose stream words are
    ``words`` (as from :func:`rademacher_words`), written into ``out[: stop - start]`` (returned).

    Exactly ``+scale`` or ``-scale`` rounded to ``out``'s dtype (float32 or float64), the same as
    ``scale * z``. Whole bytes of signs are expanded by one gather from :func:`byte_sign_table`
    (eight values per byte, one pass over ``out``: twice as fast as unpacking bits and scaling
    them); the at most seven elements before the first and after the last byte boundary from
    their bits."""
    m = max(0, stop - start)
    if out.ndim != 1 or out.dtype not in (np.float32, np.float64) or not out.flags.c_contiguous or out.size < m:
        raise ValueError(f"out must be a contiguous float32 or float64 vector of >= {m} values")
    z = out[:m]
    if m == 0:
        return z
    table = byte_sign_table(float(scale), out.dtype.type)
    body_start = min(stop, -(-start // 8) * 8)  # the first byte boundary at or after start
    body_stop = max(body_start, stop // 8 * 8)
    for a, b in ((start, body_start), (body_stop, stop)):  # partial bytes
        if b > a:
            z[a - start : b - start] = np.where(sign_bits(words, a, b), -table[0, 0], table[0, 0])
    if body_stop > body_start:
        signs = words.astype("<u4", copy=False).view(np.uint8)[body_start // 8 : body_stop // 8]
        body = z[body_start - start : body_stop - start].reshape(-1, 8)
        np.take(table, signs, axis=0, out=body, mode="clip")  # "clip": no temporary copy (cannot go out of range)
    return z


def perturbation_slice(
    round_seed: int, device: int, k: int, start: int, stop: int, distribution: Distribution, out: F32Array
) -> F32Array:
    """Elements ``start .. stop - 1`` of the perturbation ``(round_seed, device, k)``, written into
    ``out[: stop - start]`` (returned); bit-identical to the same slice of the whole vector."""
    m = stop - start
    if start < 0 or m < 0 or out.size < m or out.dtype != np.float32:
        raise ValueError(f"perturbation_slice needs 0 <= start <= stop and a float32 out of >= {m} values")
    z = out[:m]
    if m == 0:
        return z
    if distribution == "rademacher":
        first, last = start // 32, (stop - 1) // 32
        words = random_words(round_seed, device, k, last - first + 1, start_word=first)
        return expand_rademacher(words, start - 32 * first, stop - 32 * first, z)
    if distribution == "gaussian":
        w = random_words(round_seed, device, k, 2 * m, start_word=2 * start).astype(np.float64)
        u1 = (w[0::2] + 1.0) / float(_U32)
        u2 = w[1::2] / float(_U32)
        z[:] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return z
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def chunk_ranges(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` covering ``0 .. n - 1`` in steps of ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def perturbation_chunks(
    round_seed: int,
    device: int,
    k: int,
    n: int,
    distribution: Distribution,
    buffer: F32Array,
    *,
    words: U32Array | None = None,
) -> Iterator[tuple[int, F32Array]]:
    """Yield ``(start, z[start : start + len])`` over the whole perturbation, one ``buffer``-sized
    chunk at a time (the yielded array is ``buffer``'s memory: use it before the next chunk).

    Rademacher signs are generated once for the whole vector (``n / 8`` bytes; into ``words`` when
    given, e.g. to reuse them for the other sign of a central difference), then expanded per chunk.
    """
    if distribution == "rademacher":
        signs = rademacher_words(round_seed, device, k, n, out=words)
        for start, stop in chunk_ranges(n, buffer.size):
            yield start, expand_rademacher(signs, start, stop, buffer)
        return
    for start, stop in chunk_ranges(n, buffer.size):
        yield start, perturbation_slice(round_seed, device, k, start, stop, distribution, buffer)


def split(flat: F32Array, specs: Sequence[TensorSpec]) -> dict[str, F32Array]:
    """Views of ``flat`` shaped as the trainable tensors, in canonical order."""
    total = sum(t.size for t in specs)
    if flat.shape != (total,):
        raise ValueError(f"flat vector has shape {flat.shape} but the trainables hold {total} values")
    out: dict[str, F32Array] = {}
    offset = 0
    for t in specs:
        out[t.name] = flat[offset : offset + t.size].reshape(tuple(int(d) for d in t.shape))
        offset += t.size
    return out


def flatten(values: Mapping[str, npt.NDArray[np.floating]], specs: Sequence[TensorSpec]) -> F32Array:
    """Concatenate tensors in canonical order into one float32 vector."""
    return np.concatenate([np.asarray(values[t.name], dtype=np.float32).reshape(-1) for t in specs])


@dataclass(frozen=True)
class PerturbationSpec:
    """Everything needed to regenerate a round's perturbations on either side."""

    round_seed: int
    device: int
    n: int
    distribution: Distribution = "rademacher"

    def __post_init__(self) -> None:
        if not 0 <= self.round_seed < 1 << 64:
            raise ValueError(f"PerturbationSpec.round_seed must be in [0, 2**64), got {self.round_seed}")
        _check_u32("PerturbationSpec.device", self.device)
        if self.n <= 0:
            raise ValueError(f"PerturbationSpec.n must be positive, got {self.n}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"PerturbationSpec.distribution must be one of {DISTRIBUTIONS}")

    def z(self, k: int, out: F32Array | None = None) -> F32Array:
        return perturbation(self.round_seed, self.device, k, self.n, self.distribution, out=out)

    def iter_z(self, indices: Sequence[int]) -> Iterator[tuple[int, F32Array]]:
        """Yield ``(k, z_k)`` reusing one buffer (the caller must not keep ``z_k``)."""
        buf = np.empty(self.n, dtype=np.float32)
        for k in indices:
            yield k, self.z(k, out=buf)


# ------------------------------------------------------------------- bit lanes
# Many Rademacher perturbations at once: the fast path of a sum of d_k z_k
# (:mod:`fwdfleet.perturbation.sums`).
#
# A Rademacher element is one bit (1 means -1). A weighted sum of R perturbations,
# sum_i d_i z_i, takes at each element one of 2**R values: T[v] = sum_i d_i (1 - 2 v_i) where v_i
# is the element's bit in perturbation i. So instead of R float multiply-adds per element it costs
# one table look-up (:func:`lane_table`), once the R bits of every element are gathered into one
# R-bit integer, its *lane*. :func:`bit_lanes` gathers them with a bit-matrix transpose done in
# place on the words (log2 R delta swaps, no per-bit unpacking).
#
# Lane layout: the transpose leaves the lanes of R rows of W words as an (R, Q) array,
# Q = 32 W / R, whose entry (r, q) is element R q + r (all elements are there, permuted). Sums can
# stay in that layout; :func:`from_lane_order` puts a vector back in element order. Elements past
# n (the tail of the last word) are real stream bits: callers zero their positions
# (:func:`tail_positions`).

LANE_WIDTHS = (8, 16)
_LANE_DTYPES: dict[int, type[np.unsignedinteger]] = {8: np.uint8, 16: np.uint16}
# delta swap j: mask of the bits whose position has bit j clear, repeated over the word
_SWAP_MASKS = {8: np.uint64(0x00FF00FF00FF00FF), 4: np.uint64(0x0F0F0F0F0F0F0F0F),
               2: np.uint64(0x3333333333333333), 1: np.uint64(0x5555555555555555)}


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


def lane_table(coefficients: npt.NDArray[np.float64], width: int, dtype: type[np.floating],
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
    byte_tab = (BYTE_SIGNS @ c.reshape(-1, 8).T).astype(dtype)  # (256, width // 8)
    if width == 8:
        out[:] = byte_tab[:, 0]
    else:
        np.add(byte_tab[:, 1, None], byte_tab[None, :, 0], out=out.reshape(256, 256))
    return out
