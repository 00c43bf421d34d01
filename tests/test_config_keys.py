"""A TOML key that does not exist is refused before any work, naming the nearest valid key."""

from __future__ import annotations

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
