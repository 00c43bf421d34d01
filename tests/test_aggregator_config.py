"""The aggregator's TOML config: defaults, overrides, and validation errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdfleet.aggregator.config import AggregatorConfig, RoundsConfig, apply_overrides, load_config
from fwdfleet.errors import ConfigError

TOML = """
mode = "scalar"
master_seed = 7
metrics_path = "runs/m.jsonl"

[rounds]
fraction = 0.1
min_devices = 10
deadline_s = 30

[perturbation]
k = 16
shared_seeds = true

[optimizer]
name = "adam"
lr = 0.001
schedule = "linear"
warmup_steps = 10

[robust]
method = "median"

[server]   # the transport's table: left to it
address = "0.0.0.0:50051"
"""


def test_load_with_overrides(tmp_path: Path) -> None:
    p = tmp_path / "agg.toml"
    p.write_text(TOML)
    cfg = load_config(p, ["rounds.deadline_s=45", "pacing.enabled=true", "pacing.k_max=32",
                          "optimizer.name=momentum", "metrics_path=out.jsonl"])
    assert cfg.rounds.deadline_s == 45 and cfg.rounds.fraction == 0.1 and cfg.rounds.min_devices == 10
    assert cfg.perturbation.k == 16 and cfg.perturbation.shared_seeds
    assert cfg.optimizer.name == "momentum" and cfg.optimizer.schedule == "linear"
    assert cfg.pacing.enabled and cfg.pacing.k_max == 32
    assert cfg.robust.method == "median" and cfg.master_seed == 7 and cfg.metrics_path == "out.jsonl"
    assert load_config(None) == AggregatorConfig()


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["rounds.fraction=0"], "rounds.fraction"),
        (["rounds.min_results=5", "rounds.min_devices=2"], "rounds.min_results"),
        (["perturbation.k=0"], "perturbation.k"),
        (["perturbation.distribution=uniform"], "perturbation.distribution"),
        (["optimizer.name=lbfgs"], "optimizer.name"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["mode=sparse"], "mode"),
        (["robust.method=median"], "robust.method"),  # needs shared seeds
        (["robust.method=clip"], "robust.clip"),
        (["pacing.enabled=true", "perturbation.k=100"], "perturbation.k"),
        (["rounds.deadlne_s=3"], "deadlne_s"),  # a typo is an error, with the valid keys
        (["rounds.min_devices=two"], "min_devices"),
    ],
)
def test_invalid_values_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_files_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[rounds\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["rounds.deadline_s"])


def test_direct_construction_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"rounds\.over_selection"):
        RoundsConfig(over_selection=0.5)
