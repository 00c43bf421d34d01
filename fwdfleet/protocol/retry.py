"""What a client of either service retries, and how long it waits: one jittered backoff for all.

* :data:`TRANSIENT`: the statuses worth retrying (the server is away, restarting, slow or busy);
* :func:`is_transient`: a status of :data:`TRANSIENT`, unless the server marked its refusal
  permanent (``RESOURCE_EXHAUSTED`` for a request over a size limit carries ``fwdfleet-retry: no``:
  sending it again cannot help, while the server's concurrency cap asks to come back later);
* :func:`retry_after`: the delay a busy server asked for (``retry-after-ms`` trailing metadata);
* :class:`Backoff` / :func:`backoff_delay`: ``min(max, initial * multiplier**attempt)`` minus up to
  ``jitter`` of it, never less than what the server asked for. The device client and the PFF
  store client both wait with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import grpc

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})
RETRY_AFTER_KEY = "retry-after-ms"
PERMANENT_KEY = "fwdfleet-retry"


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff settings (validated: errors name the field)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay that is random

    def __post_init__(self) -> None:
        for name in ("initial_s", "max_s", "multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"backoff {name} must be a finite number >= 0, got {value}")
        if self.max_s < self.initial_s:
            raise ValueError("backoff max_s must be >= initial_s")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be in [0, 1], got {self.jitter}")


def backoff_delay(attempt: int, backoff: Backoff, rng: random.Random, floor_s: float = 0.0) -> float:
    """The wait before retry ``attempt`` (0-based), at least ``floor_s`` (a server's retry-after)."""
    base = min(backoff.max_s, backoff.initial_s * backoff.multiplier ** min(attempt, 64))
    return max(floor_s, base * (1.0 - backoff.jitter * rng.random()))


def _trailing(error: grpc.RpcError) -> dict[str, str]:
    try:
        items = error.trailing_metadata() or ()
    except Exception:  # an error raised outside a call has no metadata
        return {}
    return {str(k).lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in items}


def is_transient(error: grpc.RpcError) -> bool:
    code = error.code()
    return code in TRANSIENT and _trailing(error).get(PERMANENT_KEY) != "no"


def retry_after(error: grpc.RpcError) -> float:
    """The delay (seconds) the server asked for before a retry, 0 when it named none."""
    try:
        return max(0.0, float(_trailing(error).get(RETRY_AFTER_KEY, "0")) / 1000.0)
    except ValueError:
        return 0.0
