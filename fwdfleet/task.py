"""What a round asks of a device, and what a device gives back.

These two dataclasses are the domain side of the wire protocol: the aggregator builds a
:class:`RoundTask`, the serde module (``fwdfleet.protocol.serde``) turns it into protobuf and
back, the device runtime computes a :class:`DeviceResult`. Nothing else touches generated
protobuf classes.

A result is a few bytes per perturbation: the pairs ``(k, d_k)`` where ``d_k`` is the
directional derivative estimate along ``z_k`` (regenerated from ``(round_seed, device_index,
k)`` by :mod:`fwdfleet.perturbation`), plus counts and loss statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from fwdfleet.perturbation import DISTRIBUTIONS, Distribution

Difference = Literal["central", "forward"]
DIFFERENCES: tuple[Difference, ...] = ("central", "forward")


@dataclass(frozen=True)
class RoundTask:
    """One round's instructions to one device.

    ``k_start .. k_start + num_perturbations - 1`` are the perturbation indices the device
    evaluates. With discriminative sampling (``candidate_ratio > 1``) the device draws the
    candidate pool ``k_start .. k_start + candidate_ratio * num_perturbations - 1``, scores
    each candidate against the previous global update and keeps the ``num_perturbations``
    best; the result says which indices were kept.
    """

    round_id: int
    model_version: int
    round_seed: int
    device_index: int  # the `device` word of the perturbation counter; 0 when seeds are shared
    num_perturbations: int
    eps: float = 1e-2
    k_start: int = 0
    distribution: Distribution = "rademacher"
    difference: Difference = "central"
    candidate_ratio: int = 1
    batch_size: int = 16
    data_seed: int = 0  # which minibatch of its local data the device uses this round
    deadline_unix: float = 0.0  # 0: no deadline
    # what to upload and how to train locally; the aggregator's settings, so that a round is
    # reproducible by any device (an emulated one or a phone) from the task alone
    upload_mode: str = "scalar"  # a name in the upload-mode registries (aggregator.modes, device_runtime.modes)
    lr: float = 0.0  # local learning rate of this round (local-training modes; 0: not used)
    local_steps: int = 0  # local optimizer steps (0: ``local_epochs`` passes over the local data)
    local_epochs: int = 1  # passes over the local data when ``local_steps`` is 0
    objective: str = ""  # local objective (e.g. an FF objective); "": the device's default
    local_mode: str = ""  # how local training computes its steps (e.g. FF "closed_form"/"perturbed"); "": default

    def __post_init__(self) -> None:
        if self.round_id < 0 or self.model_version < 0:
            raise ValueError("RoundTask.round_id and model_version must be non-negative")
        if not 0 <= self.round_seed < 1 << 64:
            raise ValueError("RoundTask.round_seed must be an unsigned 64-bit integer")
        if not 0 <= self.device_index < 1 << 32:
            raise ValueError("RoundTask.device_index must be an unsigned 32-bit integer")
        if self.num_perturbations < 1:
            raise ValueError(f"RoundTask.num_perturbations must be >= 1, got {self.num_perturbations}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"RoundTask.eps must be a positive finite number, got {self.eps}")
        if self.k_start < 0 or self.k_start + self.candidate_ratio * self.num_perturbations > 1 << 32:
            raise ValueError("RoundTask perturbation indices must fit in an unsigned 32-bit integer")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"RoundTask.distribution must be one of {DISTRIBUTIONS}")
        if self.difference not in DIFFERENCES:
            raise ValueError(f"RoundTask.difference must be one of {DIFFERENCES}")
        if self.candidate_ratio < 1:
            raise ValueError(f"RoundTask.candidate_ratio must be >= 1, got {self.candidate_ratio}")
        if self.batch_size < 1:
            raise ValueError(f"RoundTask.batch_size must be >= 1, got {self.batch_size}")
        if not self.upload_mode or len(self.upload_mode) > 64:
            raise ValueError(f"RoundTask.upload_mode must be a mode name of 1..64 characters, got {self.upload_mode!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"RoundTask.lr must be a finite number >= 0, got {self.lr}")
        if not 0 <= self.local_steps < 1 << 32 or not 1 <= self.local_epochs < 1 << 32:
            raise ValueError(f"RoundTask.local_steps must be >= 0 and local_epochs >= 1, got "
                             f"{self.local_steps}, {self.local_epochs}")

    @property
    def candidate_indices(self) -> range:
        """All indices the device may report (the pool when sampling, else the K issued)."""
        return range(self.k_start, self.k_start + self.candidate_ratio * self.num_perturbations)


class InvalidResultError(ValueError):
    """A result's fields do not make a result. ``reason`` is ``MALFORMED``, ``DUPLICATE_INDEX`` or
    ``NON_FINITE`` (the wire decoder and the aggregator turn it into their own error with the same reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_result_fields(indices: tuple[int, ...], derivatives: tuple[float, ...], num_samples: int,
                        loss_mean: float, loss_std: float, *, finite_loss: bool = True) -> None:
    """The one check of a result's own consistency, wherever a result is built (device, wire, aggregator):
    paired indices and derivatives, no index twice, finite values, a non-negative count.

    ``finite_loss=False`` lets a NaN loss through: a device may build such a result (a diverged
    batch), the aggregator refuses it."""
    if len(indices) != len(derivatives):
        raise InvalidResultError("MALFORMED", f"{len(indices)} indices but {len(derivatives)} derivatives; "
                                 "they must pair up (one derivative per index)")
    if len(set(indices)) != len(indices):
        dup = sorted({k for k in indices if indices.count(k) > 1})
        raise InvalidResultError("DUPLICATE_INDEX", f"perturbation indices {dup[:5]} appear more than once; "
                                 "report each index once")
    if any(not 0 <= k < 1 << 32 for k in indices):
        raise InvalidResultError("MALFORMED", "perturbation indices must be unsigned 32-bit integers")
    bad = [f"index {k}: {d}" for k, d in zip(indices, derivatives, strict=True) if not math.isfinite(d)]
    if finite_loss:
        bad += [f"{name}: {v}" for name, v in (("loss_mean", loss_mean), ("loss_std", loss_std))
                if not math.isfinite(v)]
    if bad:
        raise InvalidResultError("NON_FINITE", f"non-finite values ({', '.join(bad[:5])}); list NaN/inf "
                                 "perturbations in `skipped` instead of uploading them")
    if num_samples < 0:
        raise InvalidResultError("MALFORMED", "num_samples must be non-negative")


@dataclass(frozen=True)
class DeviceResult:
    """A device's answer to a :class:`RoundTask`: scalars only.

    ``indices[i]`` and ``derivatives[i]`` belong together. ``skipped`` lists perturbation
    indices whose loss was NaN or infinite (never uploaded as values).
    """

    round_id: int
    model_version: int
    indices: tuple[int, ...]
    derivatives: tuple[float, ...]
    num_samples: int
    loss_mean: float
    loss_std: float = 0.0
    skipped: tuple[int, ...] = ()
    compute_seconds: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.round_id < 0 or self.model_version < 0:
            raise InvalidResultError("MALFORMED", "DeviceResult.round_id and model_version must be non-negative")
        check_result_fields(tuple(self.indices), tuple(self.derivatives), self.num_samples, self.loss_mean,
                            self.loss_std, finite_loss=False)

    def for_upload(self) -> DeviceResult:
        """This result without ``extras`` (local diagnostics such as timings): what a device sends.

        Timings would more than triple a small upload (about 40 bytes at K=1) and tell the
        aggregator nothing it needs."""
        return replace(self, extras={}) if self.extras else self


@dataclass(frozen=True, eq=False)
class Upload:
    """What a device sends for one task: its result and, in vector modes, one flat float32 vector
    (the trainables' canonical manifest order). Which of the two a mode carries is the mode's
    ``carries`` (``"scalars"``: the (k, d_k) pairs of ``result``; ``"vector"``: ``vector``)."""

    result: DeviceResult
    vector: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class JoinInfo:
    """What joining told a device: its index (the perturbation counter's ``device`` word) and where the fleet is."""

    device_index: int
    model_version: int
    round_id: int


@dataclass(frozen=True)
class SubmitReceipt:
    """The aggregator's answer to an upload (the wire's SubmitReply)."""

    accepted: bool
    duplicate: bool  # an identical retry of an upload already counted (not counted again)
    round_id: int


@dataclass(frozen=True)
class DeviceProfile:
    """What a device says about itself when it joins."""

    platform: str = "unknown"
    ram_mb: int = 0
    compute_speed: float = 1.0  # relative to a reference device
    labels: dict[str, str] = field(default_factory=dict)
    num_samples: int = 0  # examples the device holds (its shard); 0: not declared. Bounds its upload weights.

    def __post_init__(self) -> None:
        if not 0 <= self.num_samples < 1 << 63:
            raise ValueError(f"DeviceProfile.num_samples must be >= 0, got {self.num_samples}")
        if self.ram_mb < 0:
            raise ValueError(f"DeviceProfile.ram_mb must be >= 0, got {self.ram_mb}")
        if not self.compute_speed > 0:
            raise ValueError(f"DeviceProfile.compute_speed must be > 0, got {self.compute_speed}")
