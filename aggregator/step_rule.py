"""How far a scalar round steps: the probe budget, the spread of the loss differences, and a
noise statistic for pacing that is not swamped by the noise it measures.

A scalar round's estimate is ``g = mean over the round's P = sum of K pairs of d_k z_k``. With
Rademacher ``z`` and ``d_k ~ grad . z_k`` its expected squared norm is
``|grad|**2 * (1 + (n - 1) / P)`` for ``n`` trainables: when ``P << n`` almost all of ``g`` is
noise, and the step that decreases a smooth loss fastest is the exact-gradient step shrunk by
``P / (P + n - 1)``. Two options of ``[step]`` (:class:`~aggregator.config.StepConfig`) act on
that before the server optimizer sees ``g``:

* ``probe_scaling = "budget"`` multiplies ``g`` by ``P / (P + r)`` with ``r =
  effective_dim`` (0: the number of trainables). ``optimizer.lr`` is then the rate an exact
  gradient would get, and a round with 160 probes takes a step about 20x the one a round with 8
  takes (as long as ``P << r``), whatever the fleet's size that round. The loss surfaces of
  networks have a much lower effective dimension than their parameter count (MeZO's argument),
  so ``r`` is a tuning knob: the scale shrinks with ``1 / r``.
* ``normalize = "std"`` divides ``g`` by the standard deviation of the round's ``d_k`` (over
  every device and k, FZOO, arXiv 2506.09034). For Rademacher probes that standard deviation
  estimates ``|grad|`` (plus the minibatch spread between devices), so the component of the step
  along the true gradient has length about ``lr`` whatever the loss's scale: the step does not
  shrink as the loss flattens, and it does not blow up on a steep batch.

:class:`RoundStatistics` keeps what these need from a round's uploads across pacing requests: the
count, sum and sum of squares of the ``d_k`` (scalars only) and, for pacing's ``halves``
statistic, the sum of ``d_k z_k`` over the even-indexed devices (one more trainable-sized buffer,
built with :func:`aggregator.reconstruct.accumulate`). With the even half's mean ``a``, the odd
half's ``b`` and the full mean ``g``, ``<a, b>`` estimates ``|grad|**2`` without the noise (the
halves' noise is independent) while ``|g|**2`` carries it, so ``(|g|**2 - <a, b>) / <a, b>`` is
the squared relative standard error of ``g``: the quantity the older ``spread`` ratio meant to
measure, which instead sits near 1 whenever ``P << n`` because its denominator ``|g|**2`` is
itself mostly noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.reconstruct import Accumulator, Contribution, accumulate

FloatArray = npt.NDArray[np.floating]


def budget_factor(pairs: int, effective_dim: int) -> float:
    """``P / (P + r)``: the exact-gradient step's share a round with ``pairs`` probes takes."""
    if pairs < 0 or effective_dim < 1:
        raise ValueError(f"budget_factor needs pairs >= 0 and effective_dim >= 1, got {pairs}, {effective_dim}")
    return pairs / (pairs + effective_dim)


def halves_ratio(total: FloatArray, total_pairs: int, half: FloatArray, half_pairs: int) -> float:
    """Squared relative standard error of the mean ``total / total_pairs``, from the agreement of
    its two halves (``half`` and ``total - half``): ``(|g|^2 - <a, b>) / <a, b>``.

    ``inf`` when the halves do not agree in sign (no measurable signal), ``nan`` when a half is
    empty."""
    other_pairs = total_pairs - half_pairs
    if half_pairs <= 0 or other_pairs <= 0:
        return math.nan
    t = total.astype(np.float64)
    a = half.astype(np.float64)
    b = t - a
    a /= half_pairs
    b /= other_pairs
    signal = float(np.einsum("i,i->", a, b))
    g = t / total_pairs
    power = float(np.einsum("i,i->", g, g))
    if signal <= 0.0:
        return math.inf
    return max(0.0, power - signal) / signal


class RoundStatistics:
    """What the step rule and pacing need from one round's uploads (all of its requests)."""

    def __init__(self, n: int, *, halves: bool) -> None:
        self.n = n
        self.count = 0
        self.d_sum = 0.0
        self.d_sumsq = 0.0
        self._half = Accumulator(n) if halves else None

    def observe(self, contributions: Sequence[Contribution], config: AggregatorConfig, round_seed: int) -> None:
        """Add one request's contributions (call once per request, with the same list the
        round's accumulator gets)."""
        for c in contributions:
            d = np.asarray(c.derivatives, dtype=np.float64)
            self.count += d.size
            self.d_sum += float(d.sum())
            self.d_sumsq += float(d @ d)
        if self._half is not None:
            p = config.perturbation
            accumulate(self._half, [c for c in contributions if c.device_index % 2 == 0], round_seed=round_seed,
                       distribution=p.distribution, shared_seeds=p.shared_seeds,  # type: ignore[arg-type]
                       robust=config.robust)

    def d_std(self) -> float:
        """Standard deviation of the round's ``d_k`` (``nan`` with fewer than two)."""
        if self.count < 2:
            return math.nan
        mean = self.d_sum / self.count
        return math.sqrt(max(0.0, self.d_sumsq / self.count - mean * mean))

    def halves_ratio(self, acc: Accumulator) -> float:
        """:func:`halves_ratio` of the round's accumulator (``nan`` without the halves buffer)."""
        if self._half is None:
            return math.nan
        return halves_ratio(acc.total, acc.pairs, self._half.total, self._half.pairs)


@dataclass(frozen=True)
class Step:
    """The direction handed to the optimizer and how it was scaled (for the metrics line)."""

    direction: FloatArray
    factor: float
    info: dict[str, Any]


class StepRule:
    """Scales a scalar round's mean estimate per ``[step]`` (see the module docstring)."""

    def __init__(self, config: AggregatorConfig, n: int) -> None:
        self.cfg = config.step
        self.n = n
        self.effective_dim = self.cfg.effective_dim or n

    @property
    def active(self) -> bool:
        return self.cfg.normalize != "none" or self.cfg.probe_scaling != "none"

    def scale(self, grad: FloatArray, pairs: int, stats: RoundStatistics) -> Step:
        factor = 1.0
        info: dict[str, Any] = {}
        if self.cfg.probe_scaling == "budget":
            b = budget_factor(pairs, self.effective_dim)
            info["budget_factor"] = b
            factor *= b
        if self.cfg.normalize == "std":
            sd = stats.d_std()
            info["d_std"] = sd
            if not (math.isfinite(sd) and sd > 0.0):
                # one derivative, or all equal: no spread to normalise by, so no step this round
                info["skipped_step"] = "d_k spread not measurable"
                factor = 0.0
            else:
                factor /= sd
        info["step_factor"] = factor
        direction = grad if factor == 1.0 else grad * grad.dtype.type(factor)
        return Step(direction, factor, info)
