from __future__ import annotations

import pytest

from fwdfleet.fleet.profiles import EmulatedProfile, SimulatedClock, assign_profiles, preset


def test_round_seconds_adds_latency_transfer_and_scaled_compute():
    p = EmulatedProfile(compute_speed=0.5, uplink_kbps=8, downlink_kbps=80, latency_ms=100)
    # 0.2 s latency + 1000 B down at 80 kbit/s (0.1 s) + 2 s compute at half speed + 1000 B up at 8 kbit/s (1 s)
    assert p.round_seconds(1.0, 1000, 1000) == pytest.approx(0.2 + 0.1 + 2.0 + 1.0)


def test_presets_and_mix():
    assert preset("budget-phone").compute_speed < preset("flagship-phone").compute_speed
    assert preset("desktop", dropout=0.5).dropout == 0.5
    profiles = assign_profiles(200, {"budget-phone": 3, "raspberry-pi-4": 1}, seed=1)
    share = sum(p.name == "budget-phone" for p in profiles) / 200
    assert 0.65 < share < 0.85
    with pytest.raises(ValueError, match="unknown device profile"):
        assign_profiles(3, {"iphone": 1})


def test_validation_and_clock():
    with pytest.raises(ValueError, match="dropout"):
        EmulatedProfile(dropout=2)
    clock = SimulatedClock()
    assert clock.advance_round([1.0, 3.0], deadline_s=2.0) == 2.0
    assert clock.advance_round([0.5]) == 0.5
    assert clock.now_s == 2.5
