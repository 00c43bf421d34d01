"""The report rounds its figures with units, draws curves from round 0 and macro-F1 beside accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdfleet.fleet.config import load_fleet_config
from fwdfleet.fleet.report import format_figure
from fwdfleet.fleet.run import run_fleet


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("wall_seconds", 527.1564650770001, "8.8 min"),
    ("wall_seconds", 9.04, "9.0 s"),
    ("final_accuracy", 0.90812, "90.81%"),
    ("final_macro_f1", 0.5, "50.00%"),
    ("uplink_bytes_per_device_total", 3790.0, "3.7 KiB"),
    ("dense_update_bytes", 81, "81 B"),
    ("peak_rss_train_step_mb", 68.73, "69 MB"),
    ("trainable_parameters", 2410, "2,410"),
    ("final_bundle", None, "n/a"),
    ("interrupted", False, "False"),
])
def test_figures_are_rounded_with_units(key: str, value: object, shown: str) -> None:
    assert format_figure(key, value) == shown


def test_report_plots_from_round_0_on_a_fixed_axis(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    cfg = load_fleet_config(None, [
        f'fleet.out_dir="{tmp_path}"', "fleet.devices=6", "fleet.rounds=2", "fleet.eval_every=1",
        "fleet.measure_memory=false", "fleet.report_full_axis=true", "aggregator.rounds.min_devices=3",
        "aggregator.rounds.min_results=2",
    ])
    run_fleet(cfg, progress=False, log=lambda _m: None)
    page = (tmp_path / "report.html").read_text()
    assert "527.15" not in page and "%</td>" in page and "uplink bytes whole fleet" in page
    assert (tmp_path / "accuracy.png").stat().st_size > 0
