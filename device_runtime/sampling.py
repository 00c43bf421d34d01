"""Discriminative perturbation sampling (FwdLLM): keep the candidates most aligned with a guide.

With ``task.candidate_ratio > 1`` a device regenerates every candidate ``z_c`` of the pool
``task.candidate_indices`` (``candidate_ratio * K`` indices), scores it by
``|cos(z_c, guide)|`` where the guide is the previous global update (flat float32, canonical
trainable order), and keeps the ``K`` best. The kept indices are reported in the result, so
the aggregator regenerates exactly those. The sign of the cosine does not matter: the
directional derivative along ``z`` carries it.

Off by default (``candidate_ratio == 1``). Without a guide (the first round, or a device that
missed the previous model version) the first ``K`` indices of the pool are kept.

The device can compute the guide itself as ``w_t - w_{t-1}`` from the two trainable sets it
downloaded (:func:`guide_from_versions`); nothing extra travels on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from device_runtime.perturbation import F32Array, flatten, perturbation
from device_runtime.task import RoundTask
from fwdfleet.bundle import TensorSpec
from fwdfleet.errors import ConfigError


def guide_from_versions(
    new: Mapping[str, npt.NDArray[Any]], old: Mapping[str, npt.NDArray[Any]], specs: Sequence[TensorSpec]
) -> F32Array:
    """The previous global update ``w_t - w_{t-1}`` as one flat float32 vector."""
    out = flatten(new, specs)
    out -= flatten(old, specs)
    return out


def cosine_scores(task: RoundTask, n: int, guide: F32Array, *, buffer: F32Array | None = None) -> F32Array:
    """``|cos(z_c, guide)|`` for every candidate index of the task's pool, in pool order."""
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
    z = buffer if buffer is not None else np.empty(n, dtype=np.float32)
    for i, k in enumerate(pool):
        perturbation(task.round_seed, task.device_index, k, n, task.distribution, out=z)
        z_norm = np.sqrt(float(n)) if task.distribution == "rademacher" else float(np.linalg.norm(z))
        scores[i] = abs(float(np.dot(z, g))) / (z_norm * g_norm)
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
