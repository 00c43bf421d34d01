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

Chunked regeneration: :func:`perturbation_slice` writes elements ``start .. stop - 1`` of the
perturbation :func:`device_runtime.perturbation.perturbation` would produce, bit for bit (the
generator's spec is per element), so ``z`` never has to exist as a whole vector: the estimator
forms the perturbed point and the update chunk by chunk, and the generator's temporaries
(uint64 Philox lanes, unpacked bits) stay chunk-sized. (Candidate for
``device_runtime.perturbation``; it lives here because both this module and the estimator use it.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from device_runtime.perturbation import DISTRIBUTIONS, Distribution, F32Array, flatten, random_words
from device_runtime.task import RoundTask
from fwdfleet.bundle import TensorSpec
from fwdfleet.errors import ConfigError

CHUNK_ELEMENTS = 1 << 16  # z values expanded at a time (256 KB of float32)
WORD_BLOCKS = 1 << 14  # Philox blocks generated at a time: bounds the uint64 temporaries to ~1.5 MB
_U32 = float(1 << 32)
U32Array = npt.NDArray[np.uint32]


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


def expand_rademacher(words: U32Array, start: int, stop: int, out: F32Array, scale: float = 1.0) -> F32Array:
    """``scale * z`` for elements ``start .. stop - 1`` of the Rademacher ``z`` whose stream words are
    ``words`` (as from :func:`rademacher_words`), written into ``out[: stop - start]`` (returned).

    Computed as ``scale - 2 scale * bit``: exactly ``+scale`` or ``-scale`` in float32, the same as
    ``scale * z``, in two passes over the chunk."""
    z = out[: max(0, stop - start)]
    s = np.float32(scale)
    np.multiply(sign_bits(words, start, stop), np.float32(-2.0) * s, out=z, casting="unsafe")
    z += s
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
        u1 = (w[0::2] + 1.0) / _U32
        u2 = w[1::2] / _U32
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
