"""Forward-gradient estimation by perturbed inference: K directions in, K scalars out.

For each kept perturbation index ``k`` (see :mod:`device_runtime.sampling`) the device
regenerates ``z_k`` from ``(round_seed, device_index, k)`` and evaluates the batch-mean loss at
perturbed trainables:

* central difference (default, 2K forwards): ``d_k = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps)``;
* forward difference (K+1 forwards): ``d_k = (L(w + eps z_k) - L(w)) / eps``.

Memory: one inference of the graph plus **one** trainable-sized float32 buffer, the perturbed
point ``w'`` the session reads through an IOBinding, one chunk of ``z`` (64 K values) and, for
Rademacher, the signs of one ``z`` (``n / 8`` bytes).
``z_k`` never gets a buffer of its own: a Rademacher ``eps z_k`` is written into ``w'`` itself,
a Gaussian ``w' = w + eps z_k`` is formed chunk by chunk from
:func:`fwdfleet.perturbation.perturbation_slice` (bit-identical to the whole-vector
generator), and so is the update ``w += scale sum_k d_k z_k``. The current point ``w`` is read
in place, without a copy, when the trainables are views of one flat float32 vector (as
``perturbation.split`` makes them and :func:`load_flat_trainables` loads them); otherwise it is
copied once into the workspace. A Rademacher point is formed in two passes (``eps z_k`` gathered
from a byte-to-eight-values table straight into ``w'``, then ``w`` added), from signs generated
once per pair; a Gaussian ``-eps`` point is the ``+eps`` point reflected about ``w``.

A NaN or infinite loss skips that perturbation: its index goes to ``DeviceResult.skipped`` and
no value is uploaded for it. Loss statistics come from the finite passes only.

Several perturbations per session call: each forward reuses one input binding whose buffers
are updated in place (no per-call feed overhead). A bundle may also carry a *stacked* graph
(``fwdfleet export stack``) whose trainables have a leading axis of P points: the estimator then
evaluates P points per call (P more trainable-sized buffers and P times the activations), which
``benchmarks/stacked_perturbations.py`` measured 1.06-1.2x faster on the CPU provider here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle, TensorSpec
from fwdfleet.device_runtime.sampling import select_indices
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import BundleError
from fwdfleet.perturbation import (
    CHUNK_ELEMENTS,
    Distribution,
    F32Array,
    U32Array,
    expand_rademacher,
    perturbation_chunks,
    rademacher_words,
    split,
)
from fwdfleet.perturbation.sums import WeightedSeeds, add_weighted_perturbations
from fwdfleet.task import DeviceResult, RoundTask


def _address(a: npt.NDArray[Any]) -> int:
    return int(a.__array_interface__["data"][0])


def flat_view(trainables: Mapping[str, Any], specs: Sequence[TensorSpec]) -> F32Array | None:
    """The flat float32 vector the trainables are consecutive views of, in canonical order, or None."""
    arrays: list[npt.NDArray[Any]] = []
    for t in specs:
        a = trainables.get(t.name)
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous or a.size != t.size:
            return None
        arrays.append(a)
    if not arrays:
        return None
    root = arrays[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.dtype != np.float32 or root.ndim != 1 or not root.flags.c_contiguous:
        return None
    offset_bytes = _address(arrays[0]) - _address(root)
    n = sum(t.size for t in specs)
    if offset_bytes < 0 or offset_bytes % 4 or offset_bytes // 4 + n > root.size:
        return None
    position = _address(arrays[0])
    for a in arrays:
        if _address(a) != position:
            return None
        position += a.nbytes
    flat: F32Array = root[offset_bytes // 4 : offset_bytes // 4 + n]
    return flat


def load_flat_trainables(bundle: Bundle, specs: Sequence[TensorSpec]) -> F32Array:
    """The bundle's trainable values for ``specs`` as one flat float32 vector, read tensor by tensor
    (peak: the vector plus the largest tensor, never a second copy of everything)."""
    n = sum(t.size for t in specs)
    flat = np.empty(n, dtype=np.float32)
    views = split(flat, specs)
    path = bundle.path / bundle.manifest.trainables_file
    try:
        with np.load(path, allow_pickle=False) as z:
            for t in specs:
                value = z[t.name]
                if value.shape != views[t.name].shape:
                    raise ValueError(f"{t.name!r} has shape {value.shape}, the manifest says {t.shape}")
                np.copyto(views[t.name], value, casting="unsafe")
    except (OSError, KeyError, ValueError) as e:
        raise BundleError(f"cannot read trainable values from {path}: {e}; re-export the bundle") from e
    return flat


class EstimatorWorkspace:
    """The perturbed point ``wp`` (trainable-sized) and one chunk of ``z``, reused across
    perturbations and steps. ``chunk`` is the number of ``z`` values generated at a time."""

    def __init__(self, specs: Sequence[TensorSpec], *, chunk: int = CHUNK_ELEMENTS) -> None:
        if chunk < 1:
            raise ValueError(f"EstimatorWorkspace.chunk must be >= 1, got {chunk}")
        self.specs = tuple(specs)
        self.n = sum(t.size for t in self.specs)
        self.wp: F32Array = np.empty(self.n, dtype=np.float32)
        self.z: F32Array = np.empty(max(1, min(self.n, chunk)), dtype=np.float32)  # one chunk of z
        self.w0: F32Array = self.wp[:0]  # set by load(): the caller's flat vector, or _own_w0
        self._own_w0: F32Array | None = None
        self.words: U32Array = np.empty((self.n + 31) // 32, dtype=np.uint32)  # Rademacher signs of one k
        self._words_key: tuple[int, int, int] | None = None
        self._last_point: tuple[int, int, int, str, float] | None = None  # what wp holds, see perturb()
        self.wp_views = split(self.wp, self.specs)
        # Inputs the session reads: views of wp for float32 tensors, cast copies for the others.
        self.feed: dict[str, npt.NDArray[Any]] = {
            t.name: self.wp_views[t.name] if t.dtype == "float32" else np.empty(self.wp_views[t.name].shape, t.dtype)
            for t in self.specs
        }
        self._stacked: dict[str, npt.NDArray[Any]] | None = None

    def stacked_feed(self, stack: int) -> dict[str, npt.NDArray[Any]]:
        """Inputs of a stacked graph: per trainable a zeroed ``(stack, *shape)`` array, made once.
        Costs ``stack`` trainable-sized buffers (and the graph ``stack`` times the activations)."""
        if self._stacked is None or next(iter(self._stacked.values())).shape[0] != stack:
            self._stacked = {t.name: np.zeros((stack, *self.wp_views[t.name].shape), t.dtype) for t in self.specs}
        return self._stacked

    @property
    def copies_trainables(self) -> bool:
        """Whether the last :meth:`load` had to copy the trainables (they were not one flat vector)."""
        return self._own_w0 is not None and self.w0 is self._own_w0

    def load(self, trainables: Mapping[str, npt.NDArray[Any]]) -> None:
        self._last_point = None
        flat = flat_view(trainables, self.specs)
        if flat is not None:
            self.w0 = flat
            return
        if self._own_w0 is None:
            self._own_w0 = np.empty(self.n, dtype=np.float32)
        views = split(self._own_w0, self.specs)
        for t in self.specs:
            np.copyto(views[t.name], trainables[t.name], casting="unsafe")
        self.w0 = self._own_w0

    def perturb(self, round_seed: int, device: int, k: int, distribution: Distribution, scale: float) -> None:
        """``wp = w0 + scale * z_k`` (``scale`` 0: the unperturbed point).

        Rademacher: ``scale * z_k`` is expanded straight into ``wp`` from the signs of ``z_k``
        (kept for the last ``k``, ``n / 8`` bytes, so the ``-eps`` point of a pair reuses them),
        then ``w0`` is added: two passes, and both points of a pair are exactly the formula's.

        Gaussian: the ``-eps`` point, asked for right after the ``+eps`` point of the same ``k``,
        is that point reflected about ``w0``: ``wp = w0 - (wp - w0)``, two passes instead of
        regenerating ``z_k``. It equals ``w0 - scale * z_k`` up to float32 rounding (the
        +point's rounding carried over plus one more: within two ulps of ``|w0| + |scale z|``).
        Any other point is formed from ``w0`` afresh, so rounding never accumulates. ``load``
        forgets the last point."""
        s = np.float32(scale)
        point = (round_seed, device, k, distribution, float(scale))
        last, self._last_point = self._last_point, (point if scale != 0.0 else None)
        if scale == 0.0:
            np.copyto(self.wp, self.w0)
        elif distribution == "rademacher":
            if self._words_key != (round_seed, device, k):
                rademacher_words(round_seed, device, k, self.n, out=self.words)
                self._words_key = (round_seed, device, k)
            # the whole vector at once: no z buffer, and the gather and the add each stream once
            expand_rademacher(self.words, 0, self.n, self.wp, scale)  # scale * z, exactly
            self.wp += self.w0
        elif last == (round_seed, device, k, distribution, -float(scale)):
            np.subtract(self.wp, self.w0, out=self.wp)  # -scale * z_k as applied
            np.subtract(self.w0, self.wp, out=self.wp)
            self._last_point = None  # one reflection per fresh point: never a chain of them
        else:
            for start, zc in perturbation_chunks(round_seed, device, k, self.n, distribution, self.z):
                zc *= s
                np.add(zc, self.w0[start : start + zc.size], out=self.wp[start : start + zc.size])
        for t in self.specs:
            if t.dtype != "float32":
                np.copyto(self.feed[t.name], self.wp_views[t.name], casting="unsafe")


def _batch_size(batch: Mapping[str, npt.NDArray[Any]]) -> int:
    for v in batch.values():
        if v.ndim:
            return int(v.shape[0])
    return 0


@dataclass
class _Timing:
    perturbation: float = 0.0
    session: float = 0.0
    calls: int = 0


Point = tuple[int, float]  # (k, scale): the point w + scale * z_k (scale 0: w itself)


def _losses_one_by_one(
    session: BundleSession, ws: EstimatorWorkspace, batch: Mapping[str, npt.NDArray[Any]], task: RoundTask,
    points: Sequence[Point], timing: _Timing,
) -> list[npt.NDArray[np.float64]]:
    """Per-sample losses at each point, one session call per point through one input binding."""
    runner = session.bind(ws.feed, batch, ("loss",))
    out = []
    for k, scale in points:
        t = time.perf_counter()
        ws.perturb(task.round_seed, task.device_index, k, task.distribution, scale)
        timing.perturbation += time.perf_counter() - t
        t = time.perf_counter()
        out.append(np.asarray(runner.run()["loss"], dtype=np.float64).reshape(-1))
        timing.session += time.perf_counter() - t
        timing.calls += 1
    return out


def _losses_stacked(
    session: BundleSession, ws: EstimatorWorkspace, batch: Mapping[str, npt.NDArray[Any]], task: RoundTask,
    points: Sequence[Point], timing: _Timing,
) -> list[npt.NDArray[np.float64]]:
    """Per-sample losses at each point, ``session.stack`` points per session call (a stacked graph).

    Each point is formed in the workspace's flat buffer as usual, then copied into its row of the
    stacked inputs; a last, partial group leaves its unused rows as they were (their losses are
    ignored)."""
    p = session.stack
    feed = ws.stacked_feed(p)
    runner = session.bind(feed, batch, ("loss",))
    out: list[npt.NDArray[np.float64]] = []
    for first in range(0, len(points), p):
        group = points[first : first + p]
        t = time.perf_counter()
        for row, (k, scale) in enumerate(group):
            ws.perturb(task.round_seed, task.device_index, k, task.distribution, scale)
            for spec in ws.specs:
                np.copyto(feed[spec.name][row], ws.feed[spec.name])
        timing.perturbation += time.perf_counter() - t
        t = time.perf_counter()
        losses = np.asarray(runner.run()["loss"], dtype=np.float64).reshape(p, -1)
        timing.session += time.perf_counter() - t
        timing.calls += 1
        out.extend(losses[row] for row in range(len(group)))
    return out


def _mean(per_sample: npt.NDArray[np.float64]) -> float:
    return float(per_sample.mean()) if per_sample.size else math.nan


def estimate(
    session: BundleSession,
    trainables: Mapping[str, npt.NDArray[Any]],
    batch: Mapping[str, npt.NDArray[Any]],
    task: RoundTask,
    guide: F32Array | None = None,
    *,
    workspace: EstimatorWorkspace | None = None,
) -> DeviceResult:
    """Estimate the directional derivatives of the batch-mean loss along the task's perturbations.

    ``session`` may be a stacked graph's (``session.stack`` > 1, see ``fwdfleet export stack``):
    the same points are then evaluated ``stack`` at a time, with the same result up to float
    rounding inside the graph."""
    start = time.perf_counter()
    session.check_trainables(trainables)
    ws = workspace if workspace is not None and workspace.specs == session.trainable_specs else None
    ws = ws or EstimatorWorkspace(session.trainable_specs)
    ws.load(trainables)
    bookkeeping = time.perf_counter() - start

    t = time.perf_counter()
    indices = [int(k) for k in select_indices(task, ws.n, guide, buffer=ws.z)]
    sampling_seconds = time.perf_counter() - t

    eps = float(task.eps)
    points: list[Point] = [(0, 0.0)] if task.difference == "forward" else []
    for k in indices:
        points += [(k, eps), (k, -eps)] if task.difference == "central" else [(k, eps)]
    timing = _Timing()
    evaluate_points = _losses_stacked if session.stack > 1 else _losses_one_by_one
    losses = iter(evaluate_points(session, ws, batch, task, points, timing))

    center_sum: npt.NDArray[np.float64] | None = None
    centers = 0
    base = math.nan
    if task.difference == "forward":
        base_samples = next(losses)
        base = _mean(base_samples)
        if math.isfinite(base):
            center_sum, centers = base_samples.copy(), 1

    kept: list[int] = []
    derivatives: list[float] = []
    skipped: list[int] = []
    for k in indices:
        plus_samples = next(losses)
        plus = _mean(plus_samples)
        if task.difference == "central":
            minus_samples = next(losses)
            minus = _mean(minus_samples)
            d = (plus - minus) / (2.0 * eps)
            finite = math.isfinite(plus) and math.isfinite(minus) and math.isfinite(d)
            if finite:
                mid = 0.5 * (plus_samples + minus_samples)
                center_sum = mid if center_sum is None else center_sum + mid
                centers += 1
        else:
            d = (plus - base) / eps
            finite = math.isfinite(plus) and math.isfinite(d)
        if finite:
            kept.append(k)
            derivatives.append(float(d))
        else:
            skipped.append(k)

    if center_sum is not None and centers:
        center = center_sum / centers
        loss_mean, loss_std = float(center.mean()), float(center.std())
    else:
        loss_mean, loss_std = 0.0, 0.0
    total = time.perf_counter() - start
    return DeviceResult(
        round_id=task.round_id,
        model_version=task.model_version,
        indices=tuple(kept),
        derivatives=tuple(derivatives),
        num_samples=_batch_size(batch),
        loss_mean=loss_mean,
        loss_std=loss_std,
        skipped=tuple(skipped),
        compute_seconds=total,
        extras={
            "passes": float(len(points)),
            "session_calls": float(timing.calls),
            "session_seconds": timing.session,
            "perturbation_seconds": bookkeeping + timing.perturbation,
            "sampling_seconds": sampling_seconds,
            "finite_loss": 1.0 if centers else 0.0,
        },
    )


def accumulate_pairs(
    pairs: Iterable[tuple[int, float]],
    round_seed: int,
    device: int,
    distribution: Distribution,
    n: int,
    *,
    scale: float = 1.0,
    out: F32Array | None = None,
    buffer: F32Array | None = None,
) -> F32Array:
    """``out += scale * sum_k d_k z_k`` over ``(k, d_k)`` pairs, regenerating each ``z_k`` from
    ``(round_seed, device, k)`` chunk by chunk (``buffer.size`` values at a time, default one chunk).

    With ``out=None`` a zero vector is started. The one sum of both sides
    (:func:`fwdfleet.perturbation.sums.add_weighted_perturbations`) in its ``"pairs"`` form: every
    element gets ``out += float32(scale * d_k) * z_k`` in ``k`` order, the same float32 operations
    as with whole vectors, so any port of the device reproduces its update bit for bit."""
    acc = np.zeros(n, dtype=np.float32) if out is None else out
    if acc.shape != (n,) or acc.dtype != np.float32:
        raise ValueError(f"out must be a float32 vector of shape ({n},), got {acc.dtype}{list(acc.shape)}")
    listed = [(int(k), float(d)) for k, d in pairs]
    weights = np.array([scale * d for _, d in listed], dtype=np.float64)
    term = WeightedSeeds(device, tuple(k for k, _ in listed), weights)
    add_weighted_perturbations(acc, [term], round_seed=round_seed, distribution=distribution, method="pairs",
                               buffer=buffer)
    return acc


def accumulate_update(
    result: DeviceResult,
    task: RoundTask,
    n: int,
    *,
    scale: float = 1.0,
    out: F32Array | None = None,
    buffer: F32Array | None = None,
) -> F32Array:
    """``out += scale * sum_k d_k z_k`` over the result's kept indices (:func:`accumulate_pairs`).

    ``scale = 1 / len(result.indices)`` gives the dense forward gradient (FwdLLM's upload);
    ``scale = -lr / K`` applied to ``w`` is an SGD step."""
    pairs = zip(result.indices, result.derivatives, strict=True)
    return accumulate_pairs(pairs, task.round_seed, task.device_index, task.distribution, n, scale=scale, out=out,
                            buffer=buffer)  # fmt: skip


def dense_gradient(result: DeviceResult, task: RoundTask, n: int) -> F32Array:
    """The dense forward-gradient vector ``mean_k d_k z_k`` (what FwdLLM uploads; for comparison)."""
    if not result.indices:
        return np.zeros(n, dtype=np.float32)
    return accumulate_update(result, task, n, scale=1.0 / len(result.indices))


def uplink_bytes(result: DeviceResult) -> int:
    """A compact size of a result on the wire: 4+4 bytes per (k, d_k) pair, 4 per skipped index,
    plus fixed fields (round id, model version, counts, loss statistics, compute time: 40 bytes)."""
    return 8 * len(result.indices) + 4 * len(result.skipped) + 40
