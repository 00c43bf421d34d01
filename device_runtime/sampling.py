"""Discriminative perturbation sampling (FwdLLM), and the chunked regeneration of ``z`` it shares
with the estimator.

With ``task.candidate_ratio > 1`` a device regenerates every candidate ``z_c`` of the pool
``task.candidate_indices`` (``candidate_ratio * K`` indices), scores it by
``|cos(z_c, guide)|`` where the guide is the previous global update (flat float32, canonical
trainable order), and keeps the ``K`` best. The kept indices are reported in the result, so
the aggregator regenerates exactly those. The sign of the cosine does not matter: the
directional derivative along ``z`` carries it.

Off by default (``candidate_ratio == 1``). Without a guide (the first round, or a device that
missed the previous model version) the first ``K`` indices of the pool are kept.
``benchmarks/sampling_benefit.py`` measures when it helps. What it does to the estimate: the
kept directions are the ones most aligned with the old update, so ``mean_k d_k z_k`` is no
longer an unbiased estimate of the gradient but is biased towards the guide's subspace (a
momentum-like effect): measured on the digits MLP, the mean estimate's component along the
guide is 2.5-4.3x the true one at ratios 4-10 while the orthogonal components keep their
size. It improves the estimate only when the guide is well aligned with the current gradient
(cos 0.87: cos(E[g_hat], g) 0.57 -> 0.76); with a noisy guide (one device's last step, cos
0.04) local training reached the same or slightly lower accuracy at equal forward passes.

The device can compute the guide itself as ``w_t - w_{t-1}`` from the two trainable sets it
downloaded (:func:`guide_from_versions`); nothing extra travels on the wire.

Candidates are regenerated chunk by chunk (:func:`fwdfleet.perturbation.perturbation_chunks`),
so no candidate ever exists as a whole vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import TensorSpec
from fwdfleet.errors import ConfigError
from fwdfleet.perturbation import CHUNK_ELEMENTS, F32Array, flatten, perturbation_chunks
from fwdfleet.task import RoundTask


def guide_from_versions(
    new: Mapping[str, npt.NDArray[Any]], old: Mapping[str, npt.NDArray[Any]], specs: Sequence[TensorSpec]
) -> F32Array:
    """The previous global update ``w_t - w_{t-1}`` as one flat float32 vector."""
    out = flatten(new, specs)
    out -= flatten(old, specs)
    return out


def cosine_scores(task: RoundTask, n: int, guide: F32Array, *, buffer: F32Array | None = None) -> F32Array:
    """``|cos(z_c, guide)|`` for every candidate index of the task's pool, in pool order.

    ``z_c`` is regenerated chunk by chunk into ``buffer`` (any size; default one chunk).
    """
    if guide.shape != (n,):
        raise ConfigError(
            f"the sampling guide has shape {guide.shape} but the bundle has {n} trainable values; "
            "pass the previous global update flattened in the manifest's canonical order"
        )
    g = np.asarray(guide, dtype=np.float32)
    g_norm = float(np.linalg.norm(g.astype(np.float64)))
    pool = task.candidate_indices
    scores = np.zeros(len(pool), dtype=np.float32)
    if g_norm == 0.0 or not np.isfinite(g_norm):
        return scores
    z = buffer if buffer is not None else np.empty(min(n, CHUNK_ELEMENTS), dtype=np.float32)
    for i, k in enumerate(pool):
        dot, sq = 0.0, 0.0
        for start, zc in perturbation_chunks(task.round_seed, task.device_index, k, n, task.distribution, z):
            dot += float(np.dot(zc, g[start : start + zc.size]))
            if task.distribution != "rademacher":
                sq += float(np.dot(zc, zc))
        z_norm = np.sqrt(float(n)) if task.distribution == "rademacher" else np.sqrt(sq)
        scores[i] = abs(dot) / (z_norm * g_norm) if z_norm > 0 else 0.0
    return scores


def select_indices(
    task: RoundTask, n: int, guide: F32Array | None = None, *, buffer: F32Array | None = None
) -> tuple[int, ...]:
    """The perturbation indices to evaluate, ascending.

    Without sampling (``candidate_ratio == 1``) these are the task's ``K`` indices. With sampling,
    the ``K`` candidates of highest ``|cosine|`` with ``guide`` (ties go to the lower index), or
    the first ``K`` of the pool when there is no guide.
    """
    pool = task.candidate_indices
    k = task.num_perturbations
    if task.candidate_ratio == 1 or guide is None:
        return tuple(pool[:k])
    scores = cosine_scores(task, n, guide, buffer=buffer)
    order = np.argsort(-scores, kind="stable")[:k]
    return tuple(sorted(int(pool[i]) for i in order))
