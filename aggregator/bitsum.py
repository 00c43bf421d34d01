"""Per-device-seed Rademacher reconstruction in the bit domain: one table look-up per 16 perturbations.

Device ``i``'s vector ``g_i = sum_k d_ik z_ik`` with ``z = 1 - 2 b`` takes, at each element, one
of ``2**R`` values fixed by the element's ``R`` sign bits; the bits come out of the generator as
packed words, :func:`fwdfleet.perturbation_fast.bit_lanes` gathers each element's ``R``
bits into a lane, and ``g_i`` is a gather from a ``2**R``-entry table of signed sums of the
``d_ik`` (``R = 16``, or 8 when no device has more than 8 perturbations). Against the float path
(unpack, convert, multiply-add for every perturbation) this leaves the Philox itself as the
main cost.

Order of summation, fixed whatever the thread count:

* a device's table entries are exact-in-float64 sums rounded once (more accurate than summing
  ``K`` float32 products), ``g_i`` adds its tables' gathers in group order;
* devices are summed in device-index order into the partial sum of their chunk of
  ``CHUNK_DEVICES`` consecutive devices; chunks are added in order. Threads only decide who
  computes which chunk, so 1 or 8 threads give the same bits.

Sums stay in lane layout (a fixed permutation of the elements per segment of ``SEGMENT``
elements) and are put back in element order once at the end. Memory is O(n) per thread plus a
bounded number of chunk partials in flight: never O(devices x n).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fwdfleet.perturbation_fast import (
    bit_lanes,
    from_lane_order,
    sign_table,
    tail_positions,
    words_for_coords,
)

CHUNK_DEVICES = 16  # devices per partial sum: part of the summation order, never tuned per run
SEGMENT = 1 << 17  # elements per segment (a multiple of 128: whole Philox blocks)
TARGET_BLOCKS = 1 << 13  # Philox blocks per generator call (several devices per call when small)
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))

FloatArray = npt.NDArray[np.floating]


class Scalars(Protocol):
    """One device's upload: its perturbation device word, seed indices and derivatives."""

    @property
    def device_index(self) -> int: ...
    @property
    def indices(self) -> tuple[int, ...]: ...
    @property
    def derivatives(self) -> tuple[float, ...]: ...


Coefficients = Callable[[Scalars], npt.NDArray[np.float64]]  # e.g. the clipped derivatives
AddUnit = Callable[[int, float], None]  # (pairs, |g_i|**2) of each device, in order


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
    """Sums one chunk of devices into a lane-layout partial (shared by the threads: buffers are per call)."""

    def __init__(self, n: int, width: int, round_seed: int, dtype: type[np.floating],
                 coefficients: Coefficients) -> None:
        self.n, self.width, self.round_seed, self.dtype = n, width, round_seed, dtype
        self.coefficients = coefficients
        self.segments = _segments(n)
        last = self.segments[-1]
        self.lane_len = last.start + 32 * last.words
        self.tail = tail_positions(last.words, last.size, width)

    def __call__(self, devices: Sequence[Scalars]) -> tuple[FloatArray, npt.NDArray[np.float64]]:
        width, dtype = self.width, self.dtype
        partial = np.zeros(self.lane_len, dtype=dtype)
        sq = np.zeros(len(devices), dtype=np.float64)
        seg_len = max(s.words for s in self.segments) * 32
        g_buf, tmp_buf = np.empty(seg_len, dtype=dtype), np.empty(seg_len, dtype=dtype)
        table = np.empty(1 << width, dtype=dtype)  # rebuilt per use: O(1) tables alive, whatever the batch
        for first, last in self._batches(devices):
            batch = devices[first:last]
            for seg in self.segments:
                lanes = self._lanes(batch, seg)  # (groups of the batch, width, Q)
                size = 32 * seg.words
                g = g_buf[:size].reshape(width, size // width)
                tmp = tmp_buf[:size].reshape(width, size // width)
                group = 0
                for j, dev in enumerate(batch):
                    coef = self.coefficients(dev)
                    for t in range(-(-len(dev.indices) // width)):  # lanes are in range: "wrap" skips checks
                        sign_table(coef[t * width : (t + 1) * width], width, dtype, out=table)
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

    def _batches(self, devices: Sequence[Scalars]) -> list[tuple[int, int]]:
        """Consecutive device ranges with about ``TARGET_BLOCKS`` Philox blocks per segment."""
        words = max(s.words for s in self.segments)
        out, first, blocks = [], 0, 0
        for i, d in enumerate(devices):
            blocks += len(d.indices) * -(-words // 4)
            if blocks >= TARGET_BLOCKS:
                out.append((first, i + 1))
                first, blocks = i + 1, 0
        if first < len(devices):
            out.append((first, len(devices)))
        return out

    def _lanes(self, batch: Sequence[Scalars], seg: _Segment) -> npt.NDArray[np.unsignedinteger]:
        width = self.width
        coords: list[tuple[int, int]] = []
        rows: list[int] = []  # row of each real perturbation in the (groups * width) row array
        row = 0
        for d in batch:
            groups = -(-len(d.indices) // width)
            coords.extend((d.device_index, k) for k in d.indices)
            rows.extend(range(row, row + len(d.indices)))
            row += groups * width
        gen = words_for_coords(self.round_seed, coords, seg.words, seg.start // 32)
        if len(rows) == row:
            words = np.ascontiguousarray(gen)  # whole blocks from a block boundary: no copy
        else:  # pad rows of partial groups: zero bits (their coefficients are zero too)
            words = np.zeros((row, seg.words), dtype=np.uint32)
            words[np.asarray(rows, dtype=np.intp)] = gen
        return bit_lanes(words.reshape(row // width, width, seg.words), width)

    def to_elements(self, lane_total: FloatArray) -> FloatArray:
        parts = [from_lane_order(lane_total[s.start : s.start + 32 * s.words], s.size, self.width)
                 for s in self.segments]
        out: FloatArray = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out


def sum_rademacher(devices: Sequence[Scalars], *, n: int, round_seed: int, dtype: type[np.floating],
                   coefficients: Coefficients, add_unit: AddUnit, threads: int | None = None) -> FloatArray:
    """``sum_i g_i`` in element order; ``add_unit(pairs, |g_i|**2)`` is called per device, in order.

    ``devices`` must already be in the order that fixes the summation (device-index order);
    ``coefficients(device)`` gives the ``d_k`` to use (clipped or not).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    threads = DEFAULT_THREADS if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not devices:
        return np.zeros(n, dtype=dtype)
    summer = _ChunkSummer(n, lane_width(max(len(d.indices) for d in devices)), round_seed, dtype, coefficients)
    starts = range(0, len(devices), CHUNK_DEVICES)
    lane_total = np.zeros(summer.lane_len, dtype=dtype)

    def fold(start: int, result: tuple[FloatArray, npt.NDArray[np.float64]]) -> None:
        np.add(lane_total, result[0], out=lane_total)
        for dev, sq in zip(devices[start : start + CHUNK_DEVICES], result[1].tolist(), strict=True):
            add_unit(len(dev.indices), sq)

    if threads == 1 or len(starts) == 1:
        for s in starts:
            fold(s, summer(devices[s : s + CHUNK_DEVICES]))
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bitsum") as pool:
            pending: deque[tuple[int, Future[tuple[FloatArray, npt.NDArray[np.float64]]]]] = deque()
            for s in starts:  # at most threads + 1 partials alive: memory O(threads x n)
                pending.append((s, pool.submit(summer, devices[s : s + CHUNK_DEVICES])))
                if len(pending) > threads:
                    fold(*_result(pending.popleft()))
            while pending:
                fold(*_result(pending.popleft()))
    return summer.to_elements(lane_total)


def _result(item: tuple[int, Future[tuple[FloatArray, npt.NDArray[np.float64]]]]
            ) -> tuple[int, tuple[FloatArray, npt.NDArray[np.float64]]]:
    return item[0], item[1].result()
