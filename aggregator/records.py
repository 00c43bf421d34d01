"""Plain dataclasses the coordinator takes and gives (the domain side of the wire protocol)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from fwdfleet.task import DeviceProfile, JoinInfo, SubmitReceipt  # foundation types, re-exported here

__all__ = ["CoordinatorStatus", "DeviceProfile", "JoinInfo", "RoundEvent", "SubmitReceipt", "derive_seed"]


@dataclass(frozen=True)
class RoundEvent:
    """Something the coordinator decided: opened, extended, restarted, asked for more, applied."""

    kind: str  # round_opened | deadline_extended | round_restarted | extra_requested | update_applied | finished
    round_id: int
    time: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CoordinatorStatus:
    state: str  # waiting (for devices) | open | finished
    round_id: int
    model_version: int
    attempt: int
    request: int  # 0, or the number of the pacing extra request in progress
    mode: str
    k: int
    devices_registered: int
    devices_available: int
    selected: int
    target: int
    results: int
    deadline: float | None
    rounds_completed: int


def derive_seed(master_seed: int, *parts: object) -> int:
    """A 64-bit seed from the master seed and labels (round id, attempt, ...): stable across runs."""
    text = ":".join(str(p) for p in (master_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
