"""The fleet emulation config: one TOML file, like Flower's, with command-line overrides.

    [fleet]
    devices = 20                 # virtual devices
    rounds = 60                  # applied aggregator rounds
    workers = 1                  # worker processes computing device results
    transport = "inprocess"      # or "grpc": the real server + one `fwdfleet device run` process per device
    backend = "process"          # inprocess compute: local worker processes, or "ray" (fleet.ray_backend)
    ray_address = ""             # backend "ray": "" = a local Ray instance, "auto" / "ray://head:10001" = a cluster
    profiles = { desktop = 1 }   # preset mix (fleet.profiles.PRESETS), drawn per device
    out_dir = "runs/fleet"

    [dataset]                    # fleet.datasets.DatasetConfig
    name = "digits"

    [partition]                  # fleet.partition.PartitionConfig (num_devices comes from [fleet])
    scheme = "dirichlet"
    alpha = 0.5

    [model]                      # an existing bundle, or a model to export first (fleet.models)
    bundle = ""                  # path to a bundle folder or zip
    export = "mlp"               # used when bundle is empty: any export kind (mlp, ff-mlp, seq-cls, causal-lm)
    hidden = [32]                # hidden widths (mlp, ff-mlp); input and class counts come from the data
    [model.options]              # the kind's other export settings, e.g. heads = "softmax" (ff-mlp),
                                 # source = "path/to/encoder" (seq-cls), [model.options.lora] r = 8

    [aggregator]                 # the aggregator's own config (aggregator.config), same keys as
    mode = "scalar"              # `fwdfleet aggregator serve --config`
    [aggregator.optimizer]
    lr = 0.5

Overrides look like ``aggregator.optimizer.lr=0.3`` or ``fleet.rounds=10``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fwdfleet.aggregator.config import AggregatorConfig, apply_overrides, config_from_dict
from fwdfleet.errors import ConfigError, unknown_keys_error
from fwdfleet.fleet.datasets import DatasetConfig
from fwdfleet.fleet.emulate import BACKENDS
from fwdfleet.fleet.keep import BEST_METRICS
from fwdfleet.fleet.models import kind_name
from fwdfleet.fleet.partition import PartitionConfig
from fwdfleet.fleet.profiles import PRESETS

TRANSPORTS = ("inprocess", "grpc")
TABLES = ("fleet", "dataset", "partition", "model", "aggregator")


@dataclass(frozen=True)
class FleetSection:
    devices: int = 20
    rounds: int = 30
    workers: int = 1
    eval_every: int = 5
    seed: int = 0
    profiles: Mapping[str, float] = field(default_factory=lambda: {"desktop": 1.0})
    out_dir: str = "runs/fleet"
    measure_memory: bool = True
    transport: str = "inprocess"
    backend: str = "process"
    ray_address: str = ""
    best_metric: str = "accuracy"
    report_full_axis: bool = False  # the report's accuracy plots on a fixed 0-100% axis

    def __post_init__(self) -> None:
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"fleet.best_metric must be one of {BEST_METRICS}, got {self.best_metric!r}")
        if self.devices < 1:
            raise ValueError(f"fleet.devices must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ValueError(f"fleet.rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ValueError(f"fleet.workers must be >= 1, got {self.workers}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"fleet.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fleet.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.transport == "grpc" and self.backend != "process":
            raise ValueError("fleet.backend applies to the inprocess transport; with transport \"grpc\" "
                             "every device is its own process (leave fleet.backend = \"process\")")
        unknown = sorted(set(self.profiles) - set(PRESETS))
        if unknown:
            raise ValueError(f"fleet.profiles names unknown presets {unknown}; choose from {sorted(PRESETS)}")


@dataclass(frozen=True)
class ModelSection:
    bundle: str = ""
    export: str = "mlp"
    hidden: tuple[int, ...] = (32,)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bundle:
            kind_name(self.export)  # refuses a kind the exporter does not have
        if not isinstance(self.options, Mapping):
            raise ValueError("model.options must be a table of the export kind's settings")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"model.hidden sizes must be positive, got {self.hidden}")


@dataclass(frozen=True)
class FleetConfig:
    fleet: FleetSection = field(default_factory=FleetSection)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelSection = field(default_factory=ModelSection)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)


def _section(cls: type, table: Any, name: str, **fixed: Any) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    error = unknown_keys_error(f"[{name}]", table, (f.name for f in fields(cls)))
    if error is not None:
        raise error
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**{**values, **fixed})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{name}]: {e}") from e


def config_from_mapping(data: Mapping[str, Any], *, source: str = "fleet config") -> FleetConfig:
    error = unknown_keys_error("the top level (tables)", data, TABLES)
    if error is not None:
        raise ConfigError(f"{source}: {error}")
    fleet = _section(FleetSection, data.get("fleet", {}), "fleet")
    part = dict(data.get("partition", {}))
    part.pop("num_devices", None)
    return FleetConfig(
        fleet=fleet,
        dataset=_section(DatasetConfig, data.get("dataset", {}), "dataset"),
        partition=_section(PartitionConfig, part, "partition", num_devices=fleet.devices),
        model=_section(ModelSection, data.get("model", {}), "model"),
        aggregator=_aggregator(data.get("aggregator", {}), source),
    )


def _aggregator(table: Any, source: str) -> AggregatorConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [aggregator] must be a table")
    # in a fleet config every key of [aggregator] is the aggregator's (no [server] of its own)
    error = unknown_keys_error("[aggregator]", table, (f.name for f in fields(AggregatorConfig)))
    if error is not None:
        raise ConfigError(f"{source}: {error}")
    return config_from_dict(table, source=f"{source} [aggregator]")


def load_fleet_config(path: str | Path | None, overrides: Sequence[str] = (),
                      base: Mapping[str, Any] | None = None) -> FleetConfig:
    """Read ``path`` (or start from ``base``), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"fleet config not found: {p}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
        source = str(p)
    return config_from_mapping(_deep_overrides(data, overrides), source=source)


def _deep_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    # apply_overrides copies one level; copy nested tables so the caller's mapping is untouched
    def copy(v: Any) -> Any:
        return {k: copy(x) for k, x in v.items()} if isinstance(v, Mapping) else v

    return apply_overrides(copy(data), overrides)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def config_to_toml(config: Any, table: str = "") -> str:
    """``config`` (a :class:`FleetConfig` or any of its sections) as TOML that loads back to it."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            nested.append((f.name, value))
        elif value is not None and not (f.name == "num_devices" and table == "partition"):
            lines.append(f"{_toml_key(f.name)} = {_toml_value(value)}")
    out = ([f"[{table}]"] if table and (lines or not nested) else []) + lines
    for name, value in nested:
        out += ["", config_to_toml(value, f"{table}.{name}" if table else name)]
    return "\n".join(out).strip("\n") + ("\n" if not table else "")
