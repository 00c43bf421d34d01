"""Rebuild the update from seeds and scalars: ``g = mean over devices and k of d_k z_k``.

The aggregator never receives a perturbation: it regenerates ``z_k`` with
:func:`fwdfleet.perturbation.perturbation` (the one generator, imported) and accumulates
``d_k z_k`` in place into one buffer, one perturbation at a time, so memory is O(trainable
parameters) whatever the number of devices. (With shared seeds the round's few distinct
perturbations are held together, up to ``GRAM_BUDGET`` values, for their exact Gram matrix.)

* **Per-device seeds**: device ``i`` evaluated ``z(round_seed, i, k)``; each device's vector
  ``g_i = sum_k d_ik z_ik`` is built in one scratch buffer, added to the total, and its squared
  norm kept for the noise estimate (:class:`Accumulator`). Rademacher rounds take the bit-domain
  path of :mod:`aggregator.bitsum` (a table look-up per 16 perturbations instead of 16 float
  multiply-adds, optionally over threads, same result for any thread count); ``fast=False``
  keeps the plain per-perturbation path, the reference the fast one is tested against.
* **Shared seeds**: every device evaluated ``z(round_seed, 0, k)``, so the total is
  ``sum_k (sum_i d_ik) z_k``: K regenerations for the whole fleet. Robust per-seed statistics
  (median, trimmed mean) replace the inner sum by ``count_k * stat_i(d_ik)``.
* **Clipping** (either mode) scales each device's derivative vector to L2 norm <= ``clip``.

Contributions are processed in device-index order, so the result does not depend on the order
uploads arrived in (a resumed server reproduces an uninterrupted one bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fwdfleet.aggregator.bitsum import sum_rademacher
from fwdfleet.aggregator.config import RobustConfig
from fwdfleet.perturbation import Distribution, perturbation

GRAM_BUDGET = 1 << 24  # elements of the (m, n) matrix used for the exact shared-seed Gram matrix

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class Contribution:
    """One device's scalars for one request: ``derivatives[j]`` belongs to ``indices[j]``."""

    device_index: int  # registry index (sort key); also the perturbation device word unless shared
    indices: tuple[int, ...]
    derivatives: tuple[float, ...]


@dataclass(frozen=True)
class NoiseStats:
    """How noisy the accumulated estimate is.

    ``spread_sq`` is the pair-weighted mean of ``|g_j - mean|**2`` over contributions ``j``
    (each the mean of its own ``d_k z_k``), ``n_eff = W**2 / sum w_j**2`` the effective number of
    independent contributions and ``ratio = spread_sq / (n_eff * |mean|**2)`` the squared relative
    standard error of the mean: the number pacing compares with its threshold. ``nan`` with
    fewer than two contributions (nothing to compare).
    """

    ratio: float
    spread_sq: float
    mean_sqnorm: float
    n_eff: float
    units: int
    pairs: int


class Accumulator:
    """Running sums of one round (across pacing requests): O(n) memory, never O(devices x n)."""

    def __init__(self, n: int, dtype: type[np.floating] = np.float32) -> None:
        self.n = n
        self.total = np.zeros(n, dtype=dtype)  # sum over pairs of (robust) d_k z_k
        self.pairs = 0  # W: number of (device, k) pairs summed
        self.units = 0
        self.sum_w2 = 0.0
        self.sum_w_sqnorm = 0.0  # sum_j w_j |g_j|**2

    def mean(self) -> FloatArray:
        if self.pairs == 0:
            raise ValueError("no contributions accumulated; nothing to reconstruct")
        out: FloatArray = self.total / self.total.dtype.type(self.pairs)
        return out

    def add_unit(self, pairs: int, sqnorm_of_sum: float) -> None:
        """Record a contribution of ``pairs`` pairs whose sum vector has squared norm ``sqnorm_of_sum``."""
        self.units += 1
        self.pairs += pairs
        self.sum_w2 += float(pairs) ** 2
        self.sum_w_sqnorm += sqnorm_of_sum / pairs  # w_j |g_j|^2 with g_j = sum / w_j

    def noise(self) -> NoiseStats:
        if self.units < 2 or self.pairs == 0:
            return NoiseStats(math.nan, math.nan, math.nan, float(self.units), self.units, self.pairs)
        mean_sq = _sqnorm(self.total) / float(self.pairs) ** 2
        spread_sq = max(0.0, self.sum_w_sqnorm / self.pairs - mean_sq)
        n_eff = self.pairs**2 / self.sum_w2
        ratio = spread_sq / (n_eff * mean_sq) if mean_sq > 0.0 else (0.0 if spread_sq == 0.0 else math.inf)
        return NoiseStats(ratio, spread_sq, mean_sq, n_eff, self.units, self.pairs)


def _sqnorm(v: FloatArray) -> float:
    """``|v|**2`` accumulated in float64 (einsum: OpenBLAS's threaded ddot is slow on a busy machine)."""
    return float(np.einsum("i,i->", v, v, dtype=np.float64))


def _clipped(d: npt.NDArray[np.float64], robust: RobustConfig) -> npt.NDArray[np.float64]:
    if robust.method == "clip":
        norm = float(np.sqrt(d @ d))
        if norm > robust.clip:
            return d * (robust.clip / norm)
    return d


def _fill_block(block: npt.NDArray[np.float32], round_seed: int, device: int, ks: Sequence[int],
                distribution: Distribution) -> npt.NDArray[np.float32]:
    rows = block[: len(ks)]
    for r, k in enumerate(ks):
        perturbation(round_seed, device, k, block.shape[1], distribution, out=rows[r])
    return rows


def _axpy(y: FloatArray, a: float, x: npt.NDArray[np.float32], tmp: FloatArray) -> None:
    """``y += a * x`` in place (a loop of these beats OpenBLAS's small-row gemv several times)."""
    np.multiply(x, y.dtype.type(a), out=tmp)
    y += tmp


def _accumulate_per_device(acc: Accumulator, contribs: Sequence[Contribution], round_seed: int,
                           distribution: Distribution, robust: RobustConfig) -> None:
    z = np.empty(acc.n, dtype=np.float32)
    g = np.empty(acc.n, dtype=acc.total.dtype)
    tmp = np.empty(acc.n, dtype=acc.total.dtype)
    for c in contribs:
        d = _clipped(np.asarray(c.derivatives, dtype=np.float64), robust)
        g.fill(0)
        for k, dk in zip(c.indices, d, strict=True):
            perturbation(round_seed, c.device_index, k, acc.n, distribution, out=z)
            _axpy(g, float(dk), z, tmp)
        acc.total += g
        acc.add_unit(len(c.indices), _sqnorm(g))


def _accumulate_per_device_bits(acc: Accumulator, contribs: Sequence[Contribution], round_seed: int,
                                robust: RobustConfig, threads: int | None) -> None:
    acc.total += sum_rademacher(
        contribs, n=acc.n, round_seed=round_seed, dtype=acc.total.dtype.type,
        coefficients=lambda c: _clipped(np.asarray(c.derivatives, dtype=np.float64), robust),
        add_unit=acc.add_unit, threads=threads)


def _seed_statistic(values: npt.NDArray[np.float64], robust: RobustConfig) -> float:
    if robust.method == "median":
        return float(np.median(values))
    if robust.method == "trimmed_mean":
        cut = math.floor(robust.trim_fraction * values.size)
        v = np.sort(values)
        return float(v[cut : values.size - cut].mean())
    return float(values.mean())


def _accumulate_shared(acc: Accumulator, contribs: Sequence[Contribution], round_seed: int,
                       distribution: Distribution, robust: RobustConfig) -> None:
    ks = sorted({k for c in contribs for k in c.indices})
    pos = {k: j for j, k in enumerate(ks)}
    m = len(ks)
    # Per-seed reports, clipped per device; O(devices x K) scalars, no vectors.
    per_seed: list[list[float]] = [[] for _ in range(m)]
    dense_d: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] = []
    for c in contribs:
        d = _clipped(np.asarray(c.derivatives, dtype=np.float64), robust)
        idx = np.fromiter((pos[k] for k in c.indices), dtype=np.intp, count=len(c.indices))
        dense_d.append((idx, d))
        for j, v in zip(idx, d, strict=True):
            per_seed[j].append(float(v))
    coef = np.array([len(v) * _seed_statistic(np.asarray(v), robust) for v in per_seed], dtype=np.float64)
    # Gram matrix of the shared perturbations for the per-device norms: exact when it fits,
    # else its diagonal (off-diagonal terms are O(sqrt(n)) against n).
    tmp = np.empty(acc.n, dtype=acc.total.dtype)
    if m * acc.n <= GRAM_BUDGET:
        z = np.empty((m, acc.n), dtype=np.float32)
        _fill_block(z, round_seed, 0, ks, distribution)
        for j in range(m):
            _axpy(acc.total, float(coef[j]), z[j], tmp)
        gram = (z @ z.T).astype(np.float64)
        del z
    else:
        row = np.empty((1, acc.n), dtype=np.float32)
        diag = np.empty(m, dtype=np.float64)
        for j, k in enumerate(ks):
            z1 = _fill_block(row, round_seed, 0, (k,), distribution)[0]
            _axpy(acc.total, float(coef[j]), z1, tmp)
            diag[j] = _sqnorm(z1)
        gram = np.diag(diag)
    for idx, d in dense_d:
        sq = float(d @ gram[np.ix_(idx, idx)] @ d)
        acc.add_unit(len(idx), sq)
    # add_unit counted every reported pair, i.e. sum_k count_k: the weight ``coef`` was built with.


def accumulate(acc: Accumulator, contributions: Iterable[Contribution], *, round_seed: int,
               distribution: Distribution = "rademacher", shared_seeds: bool = False,
               robust: RobustConfig | None = None, fast: bool = True, threads: int | None = None) -> None:
    """Add contributions (one request's worth) to ``acc``, in device-index order.

    ``fast`` picks the bit-domain path for per-device Rademacher seeds (``threads`` workers,
    default :data:`aggregator.bitsum.DEFAULT_THREADS`; the result does not depend on them).
    """
    robust = robust or RobustConfig()
    contribs = sorted((c for c in contributions if c.indices), key=lambda c: c.device_index)
    if not contribs:
        return
    if shared_seeds:
        _accumulate_shared(acc, contribs, round_seed, distribution, robust)
    elif fast and distribution == "rademacher":
        _accumulate_per_device_bits(acc, contribs, round_seed, robust, threads)
    else:
        _accumulate_per_device(acc, contribs, round_seed, distribution, robust)


def reconstruct(contributions: Iterable[Contribution], *, n: int, round_seed: int,
                distribution: Distribution = "rademacher", shared_seeds: bool = False,
                robust: RobustConfig | None = None, dtype: type[np.floating] = np.float32,
                fast: bool = True, threads: int | None = None) -> FloatArray:
    """``g = mean over devices and k of d_k z_k`` (robust per-seed statistics when configured)."""
    acc = Accumulator(n, dtype)
    accumulate(acc, contributions, round_seed=round_seed, distribution=distribution,
               shared_seeds=shared_seeds, robust=robust, fast=fast, threads=threads)
    return acc.mean()
