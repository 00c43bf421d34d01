"""The README's first command: `fwdfleet demo` exports, trains federatedly and reports what it reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwdfleet.cli.main import main


def test_demo_learns_with_scalar_uplink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--out", str(tmp_path / "demo"), "--set", "fleet.rounds=30", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["rounds"] == 30 and summary["devices"] == 20
    assert summary["initial_accuracy"] < 0.3 and summary["final_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert summary["uplink_bytes_per_device_per_round"] < 200 < summary["dense_update_bytes"]
    assert summary["peak_rss_train_step_mb"] <= 1.05 * summary["peak_rss_inference_mb"]
    assert Path(summary["report"]).is_file() and (Path(summary["final_bundle"]) / "manifest.json").is_file()
