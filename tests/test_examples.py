"""The example configs in examples/ load, and the fleet example runs (shortened)."""

from __future__ import annotations

import json
from pathlib import Path

from fwdfleet.cli.aggregator_cmd import build_configs
from fwdfleet.cli.main import build_parser, main
from fwdfleet.fleet.config import load_fleet_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_aggregator_example_parses():
    args = build_parser().parse_args(["aggregator", "serve", "--config", str(EXAMPLES / "aggregator.toml")])
    config, server, _ = build_configs(args)
    assert config.perturbation.k == 16 and config.optimizer.schedule == "linear"
    assert server.tls_cert and server.tokens_file and not server.insecure


def test_fleet_example_runs_shortened(tmp_path, capsys):
    cfg = load_fleet_config(EXAMPLES / "fleet_digits.toml")
    assert cfg.fleet.devices == 50 and cfg.partition.scheme == "dirichlet"
    code = main([
        "fleet", "emulate", "--config", str(EXAMPLES / "fleet_digits.toml"), "--json",
        "--set", "fleet.rounds=3", "--set", "fleet.devices=12",
        "--set", "aggregator.rounds.min_devices=4", "--set", "aggregator.rounds.min_results=2",
        "--set", f'fleet.out_dir="{tmp_path}"', "--set", "fleet.measure_memory=false",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 3 and summary["devices"] == 12
    assert 0 < summary["uplink_bytes_per_device_per_round"] < 1024
    assert (tmp_path / "report.html").exists() and (tmp_path / "rounds.jsonl").exists()


def test_fedfwd_example_runs_shortened(tmp_path, capsys):
    cfg = load_fleet_config(EXAMPLES / "fleet_fedfwd_fashion.toml")
    assert cfg.model.export == "ff-mlp" and cfg.aggregator.mode == "fedavg" and cfg.aggregator.local.objective == "pon"
    code = main([
        "fleet", "emulate", "--config", str(EXAMPLES / "fleet_fedfwd_fashion.toml"), "--json",
        "--set", 'dataset.name="digits"', "--set", "fleet.rounds=2", "--set", "fleet.devices=4",
        "--set", "aggregator.rounds.min_devices=4", "--set", "aggregator.rounds.min_results=4",
        "--set", "model.hidden=[32]", "--set", f'fleet.out_dir="{tmp_path}"', "--set", "fleet.measure_memory=false",
        "--set", "aggregator.local.lr=0.01", "--set", "aggregator.local.epochs=3",  # ~20 local steps a round here
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 2 and summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert (tmp_path / "final" / "manifest.json").exists()
