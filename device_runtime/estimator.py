"""Forward-gradient estimation by perturbed inference: K directions in, K scalars out.

For each kept perturbation index ``k`` (see :mod:`device_runtime.sampling`) the device
regenerates ``z_k`` from ``(round_seed, device_index, k)`` and evaluates the batch-mean loss at
perturbed trainables:

* central difference (default, 2K forwards): ``d_k = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps)``;
* forward difference (K+1 forwards): ``d_k = (L(w + eps z_k) - L(w)) / eps``.

Memory: one inference of the graph plus three trainable-sized float32 buffers (``w``, the
perturbed ``w'`` the session reads through an IOBinding, and ``z``), reused for every ``k``
and, through an :class:`EstimatorWorkspace`, for every step. ``z_k`` is never stored.

A NaN or infinite loss skips that perturbation: its index goes to ``DeviceResult.skipped`` and
no value is uploaded for it. Loss statistics come from the finite passes only.

Several perturbations per session call: the graph takes one value per trainable tensor, so
evaluating two directions in one call would need a graph whose trainables carry a
perturbation axis (a re-export). Instead each forward reuses one input binding whose buffers
are updated in place, which removes the per-call feed overhead (about 1.5x faster per call
on tiny graphs; irrelevant once a forward takes milliseconds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from device_runtime.perturbation import F32Array, perturbation, split
from device_runtime.sampling import select_indices
from device_runtime.session import BundleSession
from device_runtime.task import DeviceResult, RoundTask
from fwdfleet.bundle import TensorSpec


class EstimatorWorkspace:
    """Trainable-sized buffers reused across perturbations and steps."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
        self.n = sum(t.size for t in self.specs)
        self.w0: F32Array = np.empty(self.n, dtype=np.float32)
        self.wp: F32Array = np.empty(self.n, dtype=np.float32)
        self.z: F32Array = np.empty(self.n, dtype=np.float32)
        self.w0_views = split(self.w0, self.specs)
        self.wp_views = split(self.wp, self.specs)
        # Inputs the session reads: views of wp for float32 tensors, cast copies for the others.
        self.feed: dict[str, npt.NDArray[Any]] = {
            t.name: self.wp_views[t.name] if t.dtype == "float32" else np.empty(self.wp_views[t.name].shape, t.dtype)
            for t in self.specs
        }

    def load(self, trainables: Mapping[str, npt.NDArray[Any]]) -> None:
        for t in self.specs:
            np.copyto(self.w0_views[t.name], trainables[t.name], casting="unsafe")

    def set_perturbed(self, scale: float) -> None:
        """``wp = w0 + scale * z`` (``scale`` 0 gives the unperturbed point)."""
        np.multiply(self.z, np.float32(scale), out=self.wp)
        self.wp += self.w0
        for t in self.specs:
            if t.dtype != "float32":
                np.copyto(self.feed[t.name], self.wp_views[t.name], casting="unsafe")


def _batch_size(batch: Mapping[str, npt.NDArray[Any]]) -> int:
    for v in batch.values():
        if v.ndim:
            return int(v.shape[0])
    return 0


def estimate(
    session: BundleSession,
    trainables: Mapping[str, npt.NDArray[Any]],
    batch: Mapping[str, npt.NDArray[Any]],
    task: RoundTask,
    guide: F32Array | None = None,
    *,
    workspace: EstimatorWorkspace | None = None,
) -> DeviceResult:
    """Estimate the directional derivatives of the batch-mean loss along the task's perturbations."""
    start = time.perf_counter()
    session.check_trainables(trainables)
    ws = workspace if workspace is not None and workspace.specs == session.trainable_specs else None
    ws = ws or EstimatorWorkspace(session.trainable_specs)
    ws.load(trainables)
    bookkeeping = time.perf_counter() - start

    t = time.perf_counter()
    indices = select_indices(task, ws.n, guide, buffer=ws.z)
    sampling_seconds = time.perf_counter() - t

    runner = session.bind(ws.feed, batch, ("loss",))
    eps = float(task.eps)
    session_seconds = 0.0
    passes = 0

    def mean_loss() -> tuple[float, npt.NDArray[np.float64]]:
        nonlocal session_seconds, passes
        t0 = time.perf_counter()
        per_sample = np.asarray(runner.run()["loss"], dtype=np.float64).reshape(-1)
        session_seconds += time.perf_counter() - t0
        passes += 1
        return float(per_sample.mean()) if per_sample.size else math.nan, per_sample

    center_sum: npt.NDArray[np.float64] | None = None
    centers = 0
    base = math.nan
    if task.difference == "forward":
        ws.z.fill(0.0)
        ws.set_perturbed(0.0)
        base, per_sample = mean_loss()
        if math.isfinite(base):
            center_sum, centers = per_sample.copy(), 1

    kept: list[int] = []
    derivatives: list[float] = []
    skipped: list[int] = []
    for k in indices:
        t0 = time.perf_counter()
        perturbation(task.round_seed, task.device_index, k, ws.n, task.distribution, out=ws.z)
        ws.set_perturbed(eps)
        bookkeeping += time.perf_counter() - t0
        plus, plus_samples = mean_loss()
        if task.difference == "central":
            t0 = time.perf_counter()
            ws.set_perturbed(-eps)
            bookkeeping += time.perf_counter() - t0
            minus, minus_samples = mean_loss()
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
            kept.append(int(k))
            derivatives.append(float(d))
        else:
            skipped.append(int(k))

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
            "passes": float(passes),
            "session_seconds": session_seconds,
            "perturbation_seconds": bookkeeping,
            "sampling_seconds": sampling_seconds,
            "finite_loss": 1.0 if centers else 0.0,
        },
    )


def accumulate_update(
    result: DeviceResult,
    task: RoundTask,
    n: int,
    *,
    scale: float = 1.0,
    out: F32Array | None = None,
    buffer: F32Array | None = None,
) -> F32Array:
    """``out += scale * sum_k d_k z_k`` over the result's kept indices, regenerating each ``z_k``.

    With ``out=None`` a zero vector is started. ``scale = 1 / len(result.indices)`` gives the
    dense forward gradient (FwdLLM's upload); ``scale = -lr / K`` applied to ``w`` is an SGD step.
    """
    acc = np.zeros(n, dtype=np.float32) if out is None else out
    z = buffer if buffer is not None else np.empty(n, dtype=np.float32)
    for k, d in zip(result.indices, result.derivatives, strict=True):
        perturbation(task.round_seed, task.device_index, k, n, task.distribution, out=z)
        z *= np.float32(scale * d)
        acc += z
    return acc


def dense_gradient(result: DeviceResult, task: RoundTask, n: int) -> F32Array:
    """The dense forward-gradient vector ``mean_k d_k z_k`` (what FwdLLM uploads; for comparison)."""
    if not result.indices:
        return np.zeros(n, dtype=np.float32)
    return accumulate_update(result, task, n, scale=1.0 / len(result.indices))


def uplink_bytes(result: DeviceResult) -> int:
    """A compact size of a result on the wire: 4+4 bytes per (k, d_k) pair, 4 per skipped index,
    plus fixed fields (round id, model version, counts, loss statistics, compute time: 40 bytes)."""
    return 8 * len(result.indices) + 4 * len(result.skipped) + 40
