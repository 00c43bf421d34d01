"""Rebuild the update from seeds and scalars: ``g = mean over devices and k of d_k z_k``.

The aggregator never receives a perturbation: it regenerates ``z_k`` from the seeds and forms
the sum with :func:`fwdfleet.perturbation.sums.add_weighted_perturbations`, the same sum the
device's update uses, into one buffer, so memory is O(trainable parameters) whatever the number
of devices. (With shared seeds the round's few distinct perturbations are held together, up to
``GRAM_BUDGET`` values, for their exact Gram matrix.)

* **Per-device seeds**: device ``i`` evaluated ``z(round_seed, i, k)``; each device's vector
  ``g_i = sum_k d_ik z_ik`` is added to the total and its squared norm kept for the noise
  estimate (:class:`Accumulator`). Rademacher rounds take the sum's bit-domain path
  (``"lanes"``: a table look-up per 16 perturbations instead of 16 float multiply-adds,
  optionally over threads, same result for any thread count); ``fast=False`` keeps the plain
  per-perturbation path (``"pairs"``), the reference the fast one is tested against.
* **Shared seeds**: every device evaluated ``z(round_seed, 0, k)``, so the total is
  ``sum_k (sum_i d_ik) z_k``: K regenerations for the whole fleet, one term of the same sum.
  Robust per-seed statistics (median, trimmed mean) replace the inner sum by
  ``count_k * stat_i(d_ik)``.
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

from fwdfleet.aggregator.config import RobustConfig
from fwdfleet.perturbation import Distribution, perturbation
from fwdfleet.perturbation.sums import SumMethod, WeightedSeeds, add_weighted_perturbations, sqnorm

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
        mean_sq = sqnorm(self.total) / float(self.pairs) ** 2
        spread_sq = max(0.0, self.sum_w_sqnorm / self.pairs - mean_sq)
        n_eff = self.pairs**2 / self.sum_w2
        ratio = spread_sq / (n_eff * mean_sq) if mean_sq > 0.0 else (0.0 if spread_sq == 0.0 else math.inf)
        return NoiseStats(ratio, spread_sq, mean_sq, n_eff, self.units, self.pairs)


def _clipped(d: npt.NDArray[np.float64], robust: RobustConfig) -> npt.NDArray[np.float64]:
    if robust.method == "clip":
        norm = float(np.sqrt(d @ d))
        if norm > robust.clip:
            return d * (robust.clip / norm)
    return d


@dataclass(frozen=True, slots=True)
class _DeviceTerm:
    """A contribution as a term of the sum, its derivatives clipped when read (never all held at once)."""

    contribution: Contribution
    robust: RobustConfig

    @property
    def device(self) -> int:
        return self.contribution.device_index

    @property
    def indices(self) -> tuple[int, ...]:
        return self.contribution.indices

    @property
    def weights(self) -> npt.NDArray[np.float64]:
        return _clipped(np.asarray(self.contribution.derivatives, dtype=np.float64), self.robust)


def _accumulate_per_device(acc: Accumulator, contribs: Sequence[Contribution], round_seed: int,
                           distribution: Distribution, robust: RobustConfig, method: SumMethod,
                           threads: int | None) -> None:
    terms = [_DeviceTerm(c, robust) for c in contribs]
    add_weighted_perturbations(acc.total, terms, round_seed=round_seed, distribution=distribution, method=method,
                               on_term=acc.add_unit, threads=threads)


def _seed_statistic(values: npt.NDArray[np.float64], robust: RobustConfig) -> float:
    if robust.method == "median":
        return float(np.median(values))
    if robust.method == "trimmed_mean":
        cut = math.floor(robust.trim_fraction * values.size)
        v = np.sort(values)
        return float(v[cut : values.size - cut].mean())
    return float(values.mean())


def _accumulate_shared(acc: Accumulator, contribs: Sequence[Contribution], round_seed: int,
                       distribution: Distribution, robust: RobustConfig, method: SumMethod,
                       threads: int | None) -> None:
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
    add_weighted_perturbations(acc.total, [WeightedSeeds(0, tuple(ks), coef)], round_seed=round_seed,
                               distribution=distribution, method=method, threads=threads)
    # Gram matrix of the shared perturbations for the per-device norms: exact when it fits,
    # else its diagonal (off-diagonal terms are O(sqrt(n)) against n; a Rademacher z has |z|**2 = n).
    if m * acc.n <= GRAM_BUDGET:
        z = np.empty((m, acc.n), dtype=np.float32)
        for j, k in enumerate(ks):
            perturbation(round_seed, 0, k, acc.n, distribution, out=z[j])
        gram = (z @ z.T).astype(np.float64)
        del z
    elif distribution == "rademacher":
        gram = np.diag(np.full(m, float(acc.n)))
    else:
        row = np.empty(acc.n, dtype=np.float32)
        gram = np.diag([sqnorm(perturbation(round_seed, 0, k, acc.n, distribution, out=row)) for k in ks])
    for idx, d in dense_d:
        sq = float(d @ gram[np.ix_(idx, idx)] @ d)
        acc.add_unit(len(idx), sq)
    # add_unit counted every reported pair, i.e. sum_k count_k: the weight ``coef`` was built with.


def accumulate(acc: Accumulator, contributions: Iterable[Contribution], *, round_seed: int,
               distribution: Distribution = "rademacher", shared_seeds: bool = False,
               robust: RobustConfig | None = None, fast: bool = True, threads: int | None = None) -> None:
    """Add contributions (one request's worth) to ``acc``, in device-index order.

    ``fast`` picks the bit-domain sum for Rademacher seeds (``threads`` workers, default
    :data:`fwdfleet.perturbation.sums.DEFAULT_THREADS`; the result does not depend on them).
    """
    robust = robust or RobustConfig()
    contribs = sorted((c for c in contributions if c.indices), key=lambda c: c.device_index)
    if not contribs:
        return
    method: SumMethod = "lanes" if fast and distribution == "rademacher" else "pairs"
    if shared_seeds:
        _accumulate_shared(acc, contribs, round_seed, distribution, robust, method, threads)
    else:
        _accumulate_per_device(acc, contribs, round_seed, distribution, robust, method, threads)


def reconstruct(contributions: Iterable[Contribution], *, n: int, round_seed: int,
                distribution: Distribution = "rademacher", shared_seeds: bool = False,
                robust: RobustConfig | None = None, dtype: type[np.floating] = np.float32,
                fast: bool = True, threads: int | None = None) -> FloatArray:
    """``g = mean over devices and k of d_k z_k`` (robust per-seed statistics when configured)."""
    acc = Accumulator(n, dtype)
    accumulate(acc, contributions, round_seed=round_seed, distribution=distribution,
               shared_seeds=shared_seeds, robust=robust, fast=fast, threads=threads)
    return acc.mean()
