"""The one sum of ``d_k z_k``: ``out += sum_i sum_k w_ik z(round_seed, device_i, k)``.

Both sides form it from seeds and scalars: the device for its local update (``w -= lr/K sum_k
d_k z_k``, the dense upload ``mean_k d_k z_k``) and the aggregator for its reconstruction
(``mean over devices and k of d_k z_k``). :func:`add_weighted_perturbations` is that sum, with
two ways of computing it:

* ``"pairs"`` (any distribution; the device's update): every product ``w_ik z_ik`` is formed
  exactly in ``out``'s dtype (a Rademacher ``z`` is +-1: ``w z`` is ``+-w`` rounded once) and
  added in term order, then ``k`` order, ``CHUNK_ELEMENTS`` at a time (Rademacher signs generated
  once per ``k``, ``n / 8`` bytes). Element by element the same additions as with whole vectors,
  so a port reproduces it bit for bit from the formula.
* ``"lanes"`` (Rademacher only; the aggregator's default): the bit-domain fast path. A term's
  vector ``g_i = sum_k w_ik z_ik``, ``z = 1 - 2 b``, takes at each element one of ``2**R``
  values fixed by the element's ``R`` sign bits; :func:`~fwdfleet.perturbation.bit_lanes` gathers
  them into lanes and ``g_i`` is one gather from a ``2**R``-entry table
  (:func:`~fwdfleet.perturbation.lane_table`) per ``R = 16`` perturbations (8 when no term has
  more than 8), instead of ``R`` float multiply-adds per element. Table entries are exact float64
  sums rounded once (more accurate than ``K`` rounded float32 products); the result differs
  from ``"pairs"`` by rounding only. ``benchmarks/aggregator_reconstruct.py`` measures both.

Order of summation with ``"lanes"``, fixed whatever the thread count: terms are summed in order
into the partial sum of their chunk of ``CHUNK_DEVICES`` consecutive terms, chunks are added in
order; threads only decide who computes which chunk, so 1 or 8 threads give the same bits. Sums
stay in lane layout (a fixed permutation of the elements per segment of ``SEGMENT`` elements)
and are put back in element order once at the end. Memory is O(n) per thread plus a bounded
number of chunk partials in flight: never O(terms x n).

With ``on_term``, each term's ``|g_i|**2`` is reported (in order) for noise statistics; its
``g_i`` is then built in a scratch vector and added to ``out`` whole (``"pairs"``), instead of
term by term straight into ``out``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from fwdfleet.perturbation import (
    CHUNK_ELEMENTS,
    DISTRIBUTIONS,
    Distribution,
    FloatArray,
    bit_lanes,
    chunk_ranges,
    expand_rademacher,
    from_lane_order,
    lane_table,
    perturbation_chunks,
    rademacher_words,
    stream_words,
    tail_positions,
)

SumMethod = Literal["pairs", "lanes"]
SUM_METHODS: tuple[SumMethod, ...] = ("pairs", "lanes")
CHUNK_DEVICES = 16  # terms per partial sum ("lanes"): part of the summation order, never tuned per run
SEGMENT = 1 << 17  # elements per segment ("lanes"; a multiple of 128: whole Philox blocks)
TARGET_BLOCKS = 1 << 13  # Philox blocks per generator call ("lanes"; several terms per call when small)
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))

F64Array = npt.NDArray[np.float64]
OnTerm = Callable[[int, float], None]  # (number of perturbations, |g_i|**2) of each term, in order


class Term(Protocol):
    """One term of the sum: the perturbations ``z(round_seed, device, k)`` for ``k`` in ``indices``,
    weighted by ``weights`` (float64, one per index). ``weights`` may be computed on each access
    (e.g. a device's derivatives clipped): the ``"lanes"`` sum reads it once per segment, so the
    terms of a whole round need not hold their weights at once."""

    @property
    def device(self) -> int: ...
    @property
    def indices(self) -> tuple[int, ...]: ...
    @property
    def weights(self) -> F64Array: ...


@dataclass(frozen=True)
class WeightedSeeds:
    """A :class:`Term` holding its weights (checked: one per index)."""

    device: int
    indices: tuple[int, ...]
    weights: F64Array = field(repr=False)

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if w.shape != (len(self.indices),):
            raise ValueError(f"WeightedSeeds has {len(self.indices)} indices but {w.size} weights")
        object.__setattr__(self, "weights", w)


def add_weighted_perturbations(
    out: FloatArray,
    terms: Sequence[Term],
    *,
    round_seed: int,
    distribution: Distribution = "rademacher",
    method: SumMethod = "pairs",
    on_term: OnTerm | None = None,
    threads: int | None = None,
    buffer: FloatArray | None = None,
) -> FloatArray:
    """``out += sum over terms (in order) of sum_k w_k z(round_seed, term.device, k)``; returns ``out``.

    ``out`` is a float32 or float64 vector of the trainables' length. ``method`` picks the way
    of computing it (module docstring; ``"lanes"`` needs Rademacher), ``threads`` the workers of
    ``"lanes"`` (default :data:`DEFAULT_THREADS`; the result does not depend on them), ``buffer``
    the chunk ``"pairs"`` expands ``z`` into (``out``'s dtype; default :data:`CHUNK_ELEMENTS`)."""
    if out.ndim != 1 or out.dtype not in (np.float32, np.float64):
        raise ValueError(f"out must be a float32 or float64 vector, got {out.dtype}{list(out.shape)}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if method not in SUM_METHODS:
        raise ValueError(f"unknown sum method {method!r}; choose one of {SUM_METHODS}")
    if method == "lanes" and distribution != "rademacher":
        raise ValueError("the 'lanes' sum needs Rademacher perturbations; use method='pairs' for Gaussian ones")
    n = out.size
    terms = [t for t in terms if t.indices]  # an empty term adds nothing and is not reported
    if n == 0 or not terms:
        return out
    if method == "lanes":
        out += _sum_lanes(terms, n=n, round_seed=round_seed, dtype=out.dtype.type,
                          on_term=on_term or _ignore, threads=threads)
        return out
    _sum_pairs(out, terms, round_seed, distribution, on_term, buffer)
    return out


def _ignore(pairs: int, sqnorm: float) -> None:
    return None


def sqnorm(v: FloatArray) -> float:
    """``|v|**2`` accumulated in float64 (einsum: OpenBLAS's threaded ddot is slow on a busy machine)."""
    return float(np.einsum("i,i->", v, v, dtype=np.float64))


# ------------------------------------------------------------------------------- pairs


def _sum_pairs(out: FloatArray, terms: Sequence[Term], round_seed: int, distribution: Distribution,
               on_term: OnTerm | None, buffer: FloatArray | None) -> None:
    n, dtype = out.size, out.dtype
    if buffer is not None and (buffer.dtype != dtype or buffer.ndim != 1 or buffer.size < 1):
        raise ValueError(f"buffer must be a non-empty {dtype} vector")
    z = buffer if buffer is not None else np.empty(max(1, min(n, CHUNK_ELEMENTS)), dtype=dtype)
    words = np.empty((n + 31) // 32, dtype=np.uint32) if distribution == "rademacher" else None
    gauss = np.empty(z.size, dtype=np.float32) if distribution != "rademacher" else None
    g = np.empty(n, dtype=dtype) if on_term is not None else None
    for term in terms:
        acc = out
        if g is not None:
            g.fill(0)
            acc = g
        for k, w in zip(term.indices, term.weights.tolist(), strict=True):
            factor = dtype.type(w)
            if words is not None:
                rademacher_words(round_seed, term.device, k, n, out=words)
                for start, stop in chunk_ranges(n, z.size):
                    acc[start:stop] += expand_rademacher(words, start, stop, z, float(factor))  # factor * z, exactly
            else:
                assert gauss is not None
                for start, zc in perturbation_chunks(round_seed, term.device, k, n, distribution, gauss):
                    part = z[: zc.size]
                    np.multiply(zc, factor, out=part)
                    acc[start : start + zc.size] += part
        if g is not None and on_term is not None:
            out += g
            on_term(len(term.indices), sqnorm(g))


# ------------------------------------------------------------------------------- lanes


@dataclass(frozen=True)
class _Segment:
    start: int  # first element (a multiple of SEGMENT) and offset in the lane-layout vector
    size: int  # elements in the segment
    words: int  # stream words covering it, rounded up to whole Philox blocks


def lane_width(max_k: int) -> int:
    return 8 if max_k <= 8 else 16


def _segments(n: int) -> list[_Segment]:
    return [_Segment(s, min(SEGMENT, n - s), 4 * -(-min(SEGMENT, n - s) // 128)) for s in range(0, n, SEGMENT)]


class _ChunkSummer:
    """Sums one chunk of terms into a lane-layout partial (shared by the threads: buffers are per call)."""

    def __init__(self, n: int, width: int, round_seed: int, dtype: type[np.floating]) -> None:
        self.n, self.width, self.round_seed, self.dtype = n, width, round_seed, dtype
        self.segments = _segments(n)
        last = self.segments[-1]
        self.lane_len = last.start + 32 * last.words
        self.tail = tail_positions(last.words, last.size, width)

    def __call__(self, terms: Sequence[Term]) -> tuple[FloatArray, F64Array]:
        width, dtype = self.width, self.dtype
        partial = np.zeros(self.lane_len, dtype=dtype)
        sq = np.zeros(len(terms), dtype=np.float64)
        seg_len = max(s.words for s in self.segments) * 32
        g_buf, tmp_buf = np.empty(seg_len, dtype=dtype), np.empty(seg_len, dtype=dtype)
        table = np.empty(1 << width, dtype=dtype)  # rebuilt per use: O(1) tables alive, whatever the batch
        for first, last in self._batches(terms):
            batch = terms[first:last]
            for seg in self.segments:
                lanes = self._lanes(batch, seg)  # (groups of the batch, width, Q)
                size = 32 * seg.words
                g = g_buf[:size].reshape(width, size // width)
                tmp = tmp_buf[:size].reshape(width, size // width)
                group = 0
                for j, term in enumerate(batch):
                    coef = term.weights
                    for t in range(-(-len(term.indices) // width)):  # lanes are in range: "wrap" skips checks
                        lane_table(coef[t * width : (t + 1) * width], width, dtype, out=table)
                        np.take(table, lanes[group], out=tmp if t else g, mode="wrap")
                        if t:
                            g += tmp
                        group += 1
                    flat = g.reshape(-1)
                    if seg is self.segments[-1]:
                        flat[self.tail] = 0
                    squares = tmp_buf[:size]
                    np.multiply(flat, flat, out=squares)
                    sq[first + j] += float(np.add.reduce(squares, dtype=np.float64))
                    partial[seg.start : seg.start + size] += flat
        return partial, sq

    def _batches(self, terms: Sequence[Term]) -> list[tuple[int, int]]:
        """Consecutive term ranges with about ``TARGET_BLOCKS`` Philox blocks per segment."""
        words = max(s.words for s in self.segments)
        out, first, blocks = [], 0, 0
        for i, term in enumerate(terms):
            blocks += len(term.indices) * -(-words // 4)
            if blocks >= TARGET_BLOCKS:
                out.append((first, i + 1))
                first, blocks = i + 1, 0
        if first < len(terms):
            out.append((first, len(terms)))
        return out

    def _lanes(self, batch: Sequence[Term], seg: _Segment) -> npt.NDArray[np.unsignedinteger]:
        width = self.width
        coords: list[tuple[int, int]] = []
        rows: list[int] = []  # row of each real perturbation in the (groups * width) row array
        row = 0
        for term in batch:
            groups = -(-len(term.indices) // width)
            coords.extend((term.device, k) for k in term.indices)
            rows.extend(range(row, row + len(term.indices)))
            row += groups * width
        gen = stream_words(self.round_seed, coords, seg.words, seg.start // 32)
        if len(rows) == row:
            words = np.ascontiguousarray(gen)  # whole blocks from a block boundary: no copy
        else:  # pad rows of partial groups: zero bits (their weights are zero too)
            words = np.zeros((row, seg.words), dtype=np.uint32)
            words[np.asarray(rows, dtype=np.intp)] = gen
        return bit_lanes(words.reshape(row // width, width, seg.words), width)

    def to_elements(self, lane_total: FloatArray) -> FloatArray:
        parts = [from_lane_order(lane_total[s.start : s.start + 32 * s.words], s.size, self.width)
                 for s in self.segments]
        out: FloatArray = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out


def _sum_lanes(terms: Sequence[Term], *, n: int, round_seed: int, dtype: type[np.floating],
               on_term: OnTerm, threads: int | None) -> FloatArray:
    """``sum_i g_i`` in element order; ``on_term(pairs, |g_i|**2)`` is called per term, in order."""
    threads = DEFAULT_THREADS if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    summer = _ChunkSummer(n, lane_width(max(len(t.indices) for t in terms)), round_seed, dtype)
    starts = range(0, len(terms), CHUNK_DEVICES)
    lane_total = np.zeros(summer.lane_len, dtype=dtype)

    def fold(start: int, result: tuple[FloatArray, F64Array]) -> None:
        np.add(lane_total, result[0], out=lane_total)
        for term, sq in zip(terms[start : start + CHUNK_DEVICES], result[1].tolist(), strict=True):
            on_term(len(term.indices), sq)

    if threads == 1 or len(starts) == 1:
        for s in starts:
            fold(s, summer(terms[s : s + CHUNK_DEVICES]))
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="perturbation-sum") as pool:
            pending: deque[tuple[int, Future[tuple[FloatArray, F64Array]]]] = deque()
            for s in starts:  # at most threads + 1 partials alive: memory O(threads x n)
                pending.append((s, pool.submit(summer, terms[s : s + CHUNK_DEVICES])))
                if len(pending) > threads:
                    fold(*_result(pending.popleft()))
            while pending:
                fold(*_result(pending.popleft()))
    return summer.to_elements(lane_total)


def _result(item: tuple[int, Future[tuple[FloatArray, F64Array]]]) -> tuple[int, tuple[FloatArray, F64Array]]:
    return item[0], item[1].result()
