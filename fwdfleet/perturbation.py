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
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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


def random_words(round_seed: int, device: int, k: int, n_words: int, start_word: int = 0) -> U32Array:
    """Words ``start_word .. start_word + n_words - 1`` of the stream for ``(round_seed, device, k)``."""
    if not 0 <= round_seed < 1 << 64:
        raise ValueError(f"round_seed must be an unsigned 64-bit integer, got {round_seed}")
    _check_u32("device", device)
    _check_u32("k", k)
    if n_words <= 0:
        return np.zeros(0, dtype=np.uint32)
    first_block, last_block = start_word // 4, (start_word + n_words - 1) // 4
    blocks = np.arange(first_block, last_block + 1, dtype=np.uint64)
    counters = np.empty((blocks.size, 4), dtype=np.uint64)
    counters[:, 0] = blocks & _MASK32
    counters[:, 1] = blocks >> np.uint64(32)
    counters[:, 2] = k
    counters[:, 3] = device
    words = philox4x32(counters, (round_seed & 0xFFFFFFFF, round_seed >> 32)).reshape(-1)
    offset = start_word - 4 * first_block
    return words[offset : offset + n_words]


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
    if not 0 <= round_seed < 1 << 64:
        raise ValueError(f"round_seed must be an unsigned 64-bit integer, got {round_seed}")
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


@functools.lru_cache(maxsize=16)
def sign_table(scale: float) -> F32Array:
    """``(256, 8)`` float32: row ``b`` is ``scale * z`` for the eight elements whose signs are the
    stream byte ``b`` (bit ``j`` for element ``j``; a set bit is -1). Read-only, cached per scale."""
    s = np.float32(scale)
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").view(np.bool_)
    table = np.where(bits, -s, s).astype(np.float32)
    table.flags.writeable = False
    return table


def expand_rademacher(words: U32Array, start: int, stop: int, out: F32Array, scale: float = 1.0) -> F32Array:
    """``scale * z`` for elements ``start .. stop - 1`` of the Rademacher ``z`` whose stream words are
    ``words`` (as from :func:`rademacher_words`), written into ``out[: stop - start]`` (returned).

    Exactly ``+scale`` or ``-scale`` in float32, the same as ``scale * z``. Whole bytes of signs
    are expanded by one gather from :func:`sign_table` (eight values per byte, one pass over
    ``out``: twice as fast as unpacking bits and scaling them); the at most seven elements before
    the first and after the last byte boundary from their bits."""
    m = max(0, stop - start)
    if out.ndim != 1 or out.dtype != np.float32 or not out.flags.c_contiguous or out.size < m:
        raise ValueError(f"out must be a contiguous float32 vector of >= {m} values")
    z = out[:m]
    if m == 0:
        return z
    table = sign_table(float(scale))
    body_start = min(stop, -(-start // 8) * 8)  # the first byte boundary at or after start
    body_stop = max(body_start, stop // 8 * 8)
    for a, b in ((start, body_start), (body_stop, stop)):  # partial bytes
        if b > a:
            z[a - start : b - start] = table[0, 0] * np.where(sign_bits(words, a, b), np.float32(-1), np.float32(1))
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
