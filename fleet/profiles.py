"""Device profiles and the simulated clock.

An emulated device runs its real computation on this desktop; its profile says how a phone
or a board would differ: relative compute speed, memory cap, link bandwidth and latency,
probability of dropping out of a round and of being available at all. The simulated clock
turns measured desktop compute time and real message sizes into what the round would take
on such a fleet. The preset numbers are assumptions for what-if reports, not measurements:
pass your own from a real device (``fwdfleet device bench`` on the phone gives the speed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class EmulatedProfile:
    name: str = "desktop"
    compute_speed: float = 1.0  # relative to this desktop: 0.25 = four times slower
    memory_cap_mb: int = 0  # 0 = no cap; a device whose measured peak exceeds it cannot take part
    uplink_kbps: float = 10_000.0
    downlink_kbps: float = 50_000.0
    latency_ms: float = 20.0
    dropout: float = 0.0  # probability of vanishing mid-round after accepting a task
    availability: float = 1.0  # probability of being online when a round starts

    def __post_init__(self) -> None:
        if not self.compute_speed > 0:
            raise ValueError(f"EmulatedProfile.compute_speed must be > 0, got {self.compute_speed}")
        if self.memory_cap_mb < 0:
            raise ValueError(f"EmulatedProfile.memory_cap_mb must be >= 0, got {self.memory_cap_mb}")
        if not (self.uplink_kbps > 0 and self.downlink_kbps > 0):
            raise ValueError("EmulatedProfile.uplink_kbps and downlink_kbps must be > 0")
        if self.latency_ms < 0:
            raise ValueError(f"EmulatedProfile.latency_ms must be >= 0, got {self.latency_ms}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"EmulatedProfile.dropout must be in [0, 1], got {self.dropout}")
        if not 0 < self.availability <= 1:
            raise ValueError(f"EmulatedProfile.availability must be in (0, 1], got {self.availability}")

    def round_seconds(self, compute_s: float, bytes_down: int, bytes_up: int) -> float:
        """Simulated wall time of one round on this device: link latency, transfers, compute."""
        down = 8.0 * bytes_down / (1000.0 * self.downlink_kbps)
        up = 8.0 * bytes_up / (1000.0 * self.uplink_kbps)
        return 2.0 * self.latency_ms / 1000.0 + down + compute_s / self.compute_speed + up


# Assumed, illustrative presets (override with your own measurements).
PRESETS: Mapping[str, EmulatedProfile] = {
    "desktop": EmulatedProfile(),
    "flagship-phone": EmulatedProfile("flagship-phone", 0.5, 8192, 5_000, 30_000, 40, 0.02, 0.9),
    "budget-phone": EmulatedProfile("budget-phone", 0.15, 3072, 1_000, 8_000, 80, 0.1, 0.7),
    "raspberry-pi-4": EmulatedProfile("raspberry-pi-4", 0.2, 4096, 20_000, 50_000, 5, 0.0, 1.0),
}


def preset(name: str, **overrides: float | int | str) -> EmulatedProfile:
    if name not in PRESETS:
        raise ValueError(f"unknown device profile {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def assign_profiles(num_devices: int, mix: Mapping[str, float], seed: int = 0) -> list[EmulatedProfile]:
    """Give each device a preset, drawn with the given weights (e.g. {"budget-phone": 0.7, ...})."""
    names: Sequence[str] = sorted(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    if weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(f"profile mix weights must be non-negative and not all zero, got {dict(mix)}")
    for n in names:
        preset(n)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(names), size=num_devices, p=weights / weights.sum())
    return [PRESETS[names[i]] for i in picks]


@dataclass
class SimulatedClock:
    """Simulated fleet time: a round lasts as long as its slowest on-time participant."""

    now_s: float = 0.0

    def advance_round(self, device_seconds: Sequence[float], deadline_s: float = 0.0) -> float:
        if not device_seconds:
            step = deadline_s
        else:
            step = max(device_seconds)
            if deadline_s > 0:
                step = min(step, deadline_s)
        self.now_s += step
        return step
