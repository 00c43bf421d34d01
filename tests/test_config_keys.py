"""A TOML key that does not exist is refused before any work, naming the nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.errors import ConfigError
from fwdfleet.fleet.config import load_fleet_config


@pytest.mark.parametrize(("override", "wrong", "nearest"), [
    ("fleet.devcies=4", "devcies", "devices"),
    ("dataset.test_fracton=0.3", "test_fracton", "test_fraction"),
    ("aggregator.optimizer.momentun=0.5", "momentun", "momentum"),
    ("aggregator.optimzer.lr=0.1", "optimzer", "optimizer"),  # a misspelt table is not silently ignored
    ("aggregater.mode=\"scalar\"", "aggregater", "aggregator"),
    ("model.hiden=[8]", "hiden", "hidden"),
])
def test_unknown_key_names_the_nearest_valid_one(override: str, wrong: str, nearest: str) -> None:
    with pytest.raises(ConfigError, match=f"'{wrong}' \\(did you mean '{nearest}'\\?\\)"):
        load_fleet_config(None, [override])


def test_a_key_like_none_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'zzzz' in \[rounds\]; valid keys: \[.*'batch_size'"):
        config_from_dict({"rounds": {"zzzz": 1}})


def test_print_config_shows_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    from fwdfleet.cli.main import main
    from fwdfleet.fleet.config import config_from_mapping

    example = str(Path(__file__).resolve().parents[1] / "examples" / "fleet_fedfwd_fashion.toml")
    assert main(["fleet", "emulate", "--config", example, "--set", "fleet.rounds=7", "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = config_from_mapping(tomllib.loads(text))  # loads back to the very same configuration
    assert printed == load_fleet_config(example, ["fleet.rounds=7"])
    assert printed.fleet.rounds == 7 and "[aggregator.local]" in text and 'objective = "pon"' in text
