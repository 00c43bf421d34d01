"""Checks every upload must pass before it is counted.

* :func:`build_result` turns raw wire fields into a :class:`~fwdfleet.task.DeviceResult`,
  rejecting NaN/inf values, repeated indices and inconsistent lengths with their own codes
  (``DeviceResult`` itself would raise a bare ``ValueError``). The servicer should call it.
* :func:`check_result` checks a result against what was issued to that device: current round
  and model version, indices inside the issued range (the whole candidate pool with
  discriminative sampling), at most K of them, finite and bounded values.
* :func:`check_vector` does the same for dense gradients and FedAvg weights.
* :class:`Ledger` enforces one contribution per device per request: an identical retry is
  recognised by its fingerprint (accepted, not counted again); a different second upload is
  refused with ``ALREADY_SUBMITTED``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fwdfleet.aggregator.config import ValidationConfig
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.task import DeviceProfile, DeviceResult, InvalidResultError, check_result_fields


@dataclass(frozen=True)
class Issued:
    """What one request of a round asked of one device."""

    round_id: int
    model_version: int
    request: int  # 0: the round's task; 1, 2, ...: pacing's extra requests
    k_start: int
    num_perturbations: int
    candidate_ratio: int = 1
    max_samples: int | None = None  # the most samples an honest answer can claim (None: the shard bounds it)

    @property
    def allowed(self) -> range:
        return range(self.k_start, self.k_start + self.candidate_ratio * self.num_perturbations)


def _reject(code: RejectCode, message: str) -> RejectedError:
    return RejectedError(code, message)


def _check_scalars(result: DeviceResult) -> None:
    try:
        check_result_fields(result.indices, result.derivatives, result.num_samples, result.loss_mean,
                            result.loss_std)
    except InvalidResultError as e:
        raise _reject(RejectCode(e.reason), str(e)) from e


def build_result(*, round_id: int, model_version: int, indices: Sequence[int], derivatives: Sequence[float],
                 num_samples: int, loss_mean: float, loss_std: float = 0.0, skipped: Sequence[int] = (),
                 compute_seconds: float = 0.0, extras: Mapping[str, float] | None = None) -> DeviceResult:
    """A :class:`DeviceResult` from raw fields, or :class:`RejectedError` with the reason."""
    try:
        result = DeviceResult(round_id=int(round_id), model_version=int(model_version),
                              indices=tuple(int(k) for k in indices),
                              derivatives=tuple(float(d) for d in derivatives), num_samples=int(num_samples),
                              loss_mean=float(loss_mean), loss_std=float(loss_std),
                              skipped=tuple(int(k) for k in skipped), compute_seconds=float(compute_seconds),
                              extras=dict(extras or {}))
    except InvalidResultError as e:
        raise _reject(RejectCode(e.reason), str(e)) from e
    except (ValueError, TypeError) as e:
        raise _reject(RejectCode.MALFORMED, f"result fields are invalid: {e}") from e
    _check_scalars(result)
    return result


MAX_PROFILE_TEXT = 64  # characters of the platform name and of each label key and value
MAX_PROFILE_LABELS = 16


def check_profile(profile: DeviceProfile) -> None:
    """A join's profile is kept in memory and journaled: its strings are bounded (MALFORMED beyond)."""
    texts = [profile.platform, *profile.labels, *profile.labels.values()]
    if len(profile.labels) > MAX_PROFILE_LABELS or any(len(t) > MAX_PROFILE_TEXT for t in texts):
        raise _reject(RejectCode.MALFORMED, f"the device profile is too large: at most {MAX_PROFILE_LABELS} labels "
                      f"and {MAX_PROFILE_TEXT} characters per platform name, label key and value")


def check_round(result: DeviceResult, round_id: int | None, model_version: int) -> None:
    if round_id is None:
        raise _reject(RejectCode.STALE_ROUND, f"round {result.round_id} is closed and no round is open; "
                      "fetch a new task")
    if result.round_id != round_id or result.model_version != model_version:
        raise _reject(RejectCode.STALE_ROUND, f"result is for round {result.round_id} / model version "
                      f"{result.model_version} but the current round is {round_id} / version {model_version}; "
                      "drop it and fetch a new task")


def check_result(result: DeviceResult, issued: Issued, limits: ValidationConfig, *, scalar: bool = True) -> None:
    """Raise :class:`RejectedError` unless ``result`` answers ``issued`` within ``limits``."""
    check_round(result, issued.round_id, issued.model_version)
    _check_scalars(result)
    if not scalar:
        if result.indices:
            raise _reject(RejectCode.MALFORMED, "this round takes a vector upload, not (index, derivative) pairs")
        return
    if not result.indices:
        raise _reject(RejectCode.MALFORMED, "the result holds no derivatives (all skipped?); "
                      "retry with a new minibatch or larger eps")
    allowed = issued.allowed
    outside = [k for k in result.indices if k not in allowed]
    if outside:
        raise _reject(RejectCode.BAD_INDEX, f"indices {outside[:5]} were not issued to this device "
                      f"(issued {allowed.start}..{allowed.stop - 1})")
    if len(result.indices) > issued.num_perturbations:
        raise _reject(RejectCode.BAD_INDEX, f"{len(result.indices)} indices reported but only "
                      f"{issued.num_perturbations} were asked for; keep the best {issued.num_perturbations}")
    big = max(abs(d) for d in result.derivatives)
    if big > limits.max_abs_derivative:
        raise _reject(RejectCode.TOO_LARGE, f"|d_k| = {big:.3g} exceeds validation.max_abs_derivative="
                      f"{limits.max_abs_derivative:g}; lower the learning rate or check the device's data")


def check_vector(values: np.ndarray, n: int, limits: ValidationConfig, what: str = "vector") -> None:
    """A dense gradient or flat weight vector: right size, finite, bounded."""
    if values.ndim != 1 or values.shape[0] != n or values.dtype.kind != "f":
        raise _reject(RejectCode.MALFORMED, f"{what} must be a flat float vector of {n} values, got "
                      f"{values.dtype}{list(values.shape)}")
    if not np.isfinite(values).all():
        raise _reject(RejectCode.NON_FINITE, f"{what} holds NaN or inf; do not upload a diverged model")
    big = float(np.abs(values).max()) if n else 0.0
    if big > limits.max_abs_value:
        raise _reject(RejectCode.TOO_LARGE, f"{what} has |value| = {big:.3g} > validation.max_abs_value="
                      f"{limits.max_abs_value:g}")


def fingerprint(result: DeviceResult, payload: bytes = b"") -> str:
    """Identity of an upload: the same retry has the same fingerprint (timings excluded)."""
    body = json.dumps([result.round_id, result.model_version, list(result.indices),
                       [repr(d) for d in result.derivatives], result.num_samples, repr(result.loss_mean),
                       repr(result.loss_std), list(result.skipped)])
    h = hashlib.sha256(body.encode())
    h.update(payload)
    return h.hexdigest()


class Ledger:
    """Accepted uploads: who answered which request of the current and the previous round, and the
    last ``keep`` fingerprints of every device whatever their round, so that the retry of a counted
    upload is recognised however many rounds (and, restored from the receipts journal, restarts) later."""

    def __init__(self, keep: int = 8) -> None:
        self._rounds: dict[int, dict[str, dict[int, str]]] = {}
        self._recent: dict[str, list[str]] = {}
        self._keep = keep

    def start_round(self, round_id: int) -> None:
        for r in [r for r in self._rounds if r < round_id - 1]:
            del self._rounds[r]
        self._rounds.setdefault(round_id, {})

    def is_duplicate(self, device_id: str, round_id: int, fp: str) -> bool:
        return fp in self._recent.get(device_id, ()) or fp in self._rounds.get(round_id, {}).get(device_id, {}).values()

    def answered(self, device_id: str, round_id: int, request: int) -> bool:
        return request in self._rounds.get(round_id, {}).get(device_id, {})

    def record(self, device_id: str, round_id: int, request: int, fp: str) -> None:
        self._rounds.setdefault(round_id, {}).setdefault(device_id, {})[request] = fp
        self.remember(device_id, fp)

    def remember(self, device_id: str, fp: str) -> None:
        """A receipt of a counted upload (the fingerprint names its round): kept per device, newest last."""
        recent = self._recent.setdefault(device_id, [])
        if fp in recent:
            return
        recent.append(fp)
        if len(recent) > self._keep:
            del recent[: len(recent) - self._keep]

    def round_receipts(self, round_id: int) -> list[tuple[str, str]]:
        """(device id, fingerprint) of every upload counted in ``round_id``."""
        return [(d, fp) for d, requests in self._rounds.get(round_id, {}).items() for fp in requests.values()]

    def receipts(self) -> list[tuple[str, str]]:
        """Every receipt kept (what a compacted receipts journal holds)."""
        return [(d, fp) for d, fps in self._recent.items() for fp in fps]
