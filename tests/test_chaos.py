"""Chaos in the suite: the aggregator process is SIGKILLed at seeded random moments while three real
`fwdfleet device run` processes train; every device finishes (no counted upload refused on retry)
and the final trainables equal an uninterrupted run's bit for bit (none lost, none counted twice).
The suite makes 4 kills; `python benchmarks/chaos_kill.py` makes 12 over 40 rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def test_random_kills_of_the_aggregator_leave_the_model_identical_and_every_device_finishes(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.chaos_kill import run_chaos

    out = run_chaos(tmp_path, kills=4, rounds=16, seed=3, timeout=600)
    assert out["kills"] == 4, out
    assert out["identical"], out
    assert out["moved"] > 0
