"""The aggregator's configuration: frozen dataclasses, validated on construction, read from TOML.

A config file looks like Flower's ``pyproject`` tables::

    mode = "scalar"          # scalar (seeds + scalars) | dense (gradient vectors) | fedavg (weights)
    master_seed = 0
    metrics_path = "runs/metrics.jsonl"

    [rounds]
    fraction = 0.1
    min_devices = 10
    deadline_s = 30

    [perturbation]
    k = 16
    shared_seeds = true

Every section is optional. :func:`load_config` applies command-line style overrides
(``"rounds.deadline_s=30"``; the value is parsed as a TOML value, bare words as strings) and
raises :class:`fwdfleet.errors.ConfigError` naming the field. Top-level tables this module does
not know (``[server]`` for the transport) are left to their owners; unknown keys inside a known
table are errors, because a typo there silently changes an experiment.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fwdfleet.errors import ConfigError, unknown_keys_error
from fwdfleet.lr_schedule import LR_SCHEDULES
from fwdfleet.perturbation import DISTRIBUTIONS
from fwdfleet.task import DIFFERENCES

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "linear")
ROBUST_METHODS = ("none", "clip", "trimmed_mean", "median")
STEP_NORMALIZE = ("none", "std")
STEP_PROBE_SCALING = ("none", "budget")
PACING_STATISTICS = ("halves", "spread")


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name} {msg}")


def _positive(value: float, name: str) -> None:
    _require(math.isfinite(value) and value > 0, name, f"must be a positive finite number, got {value}")


@dataclass(frozen=True)
class RoundsConfig:
    """Who takes part in a round and how long the aggregator waits for them.

    A round opens once ``min_available`` devices (default ``min_devices``) are live, asks
    ``target = max(min_devices, ceil(fraction * available))`` results and selects
    ``ceil(target * over_selection)`` devices (capped at those available), so stragglers do not
    hold it up: it closes as soon as ``target`` results arrived, or at the deadline with whatever
    arrived if that is at least ``min_results``; otherwise the deadline is extended up to
    ``max_extensions`` times, then the round restarts with a fresh selection and seed.
    """

    fraction: float = 1.0
    min_devices: int = 1
    min_available: int = 0  # live devices needed before a round opens (0: min_devices)
    over_selection: float = 1.0
    deadline_s: float = 60.0
    num_rounds: int = 0  # 0: no limit
    min_results: int = 1
    max_extensions: int = 2
    heartbeat_timeout_s: float = 300.0  # a device unseen for this long is not selected
    batch_size: int = 16

    def __post_init__(self) -> None:
        _require(0 < self.fraction <= 1, "rounds.fraction", f"must be in (0, 1], got {self.fraction}")
        _require(self.min_devices >= 1, "rounds.min_devices", f"must be >= 1, got {self.min_devices}")
        _require(
            self.min_available == 0 or self.min_available >= self.min_devices,
            "rounds.min_available",
            f"must be 0 or >= rounds.min_devices={self.min_devices}, got {self.min_available}",
        )
        _require(self.over_selection >= 1, "rounds.over_selection", f"must be >= 1, got {self.over_selection}")
        _positive(self.deadline_s, "rounds.deadline_s")
        _require(self.num_rounds >= 0, "rounds.num_rounds", "must be >= 0 (0 means no limit)")
        _require(
            1 <= self.min_results <= self.min_devices,
            "rounds.min_results",
            f"must be in [1, rounds.min_devices={self.min_devices}], got {self.min_results}",
        )
        _require(self.max_extensions >= 0, "rounds.max_extensions", "must be >= 0")
        _positive(self.heartbeat_timeout_s, "rounds.heartbeat_timeout_s")
        _require(self.batch_size >= 1, "rounds.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PerturbationConfig:
    """What a device evaluates: K perturbations of size eps, drawn per device or shared."""

    k: int = 4
    eps: float = 1e-2
    distribution: str = "rademacher"
    difference: str = "central"
    candidate_ratio: int = 1  # > 1: discriminative sampling from a pool of ratio * k candidates
    shared_seeds: bool = False  # every device evaluates the same z_k (device word 0)

    def __post_init__(self) -> None:
        _require(self.k >= 1, "perturbation.k", f"must be >= 1, got {self.k}")
        _positive(self.eps, "perturbation.eps")
        _require(self.distribution in DISTRIBUTIONS, "perturbation.distribution", f"must be one of {DISTRIBUTIONS}")
        _require(self.difference in DIFFERENCES, "perturbation.difference", f"must be one of {DIFFERENCES}")
        _require(self.candidate_ratio >= 1, "perturbation.candidate_ratio", "must be >= 1")


@dataclass(frozen=True)
class OptimizerConfig:
    """The server optimizer and its learning-rate schedule.

    ``schedule = "linear"`` is FwdLLM's: linear warm-up from 0 over ``warmup_steps`` updates, then
    linear decay to ``final_lr_ratio * lr`` at ``total_steps`` (0: ``rounds.num_rounds``; both 0:
    no decay after the warm-up).
    """

    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, "optimizer.name", f"must be one of {OPTIMIZERS}, got {self.name!r}")
        _positive(self.lr, "optimizer.lr")
        _require(0 <= self.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
        _require(0 <= self.beta1 < 1, "optimizer.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optimizer.beta2", "must be in [0, 1)")
        _positive(self.adam_eps, "optimizer.adam_eps")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _require(self.schedule in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(self.total_steps >= 0, "optimizer.total_steps", "must be >= 0")
        _require(0 <= self.final_lr_ratio <= 1, "optimizer.final_lr_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class PacingConfig:
    """FwdLLM's variance-controlled pacing (see :mod:`aggregator.pacing`).

    ``threshold`` bounds the squared relative standard error of the round's estimate
    (``spread**2 / (n_eff * |mean|**2)``); it depends on the model, like FwdLLM's per-model
    threshold. Below ``shrink_below * threshold`` the next round halves K.

    ``statistic`` says how that error is measured (and what the metrics log calls ``noise_ratio``,
    pacing on or off): ``halves`` (default) from the agreement of the
    estimates of the even- and odd-indexed devices (:func:`aggregator.step_rule.halves_ratio`),
    which grows when there are too few probes for the number of trainables; ``spread`` from the
    contributions' spread around their mean, which sits near 1 whenever the probes per round are
    far fewer than the trainables (kept for comparison).
    """

    enabled: bool = False
    statistic: str = "halves"
    threshold: float = 1.0
    max_extra_requests: int = 2
    k_min: int = 1
    k_max: int = 64
    shrink_below: float = 0.25

    def __post_init__(self) -> None:
        _positive(self.threshold, "pacing.threshold")
        _require(self.max_extra_requests >= 0, "pacing.max_extra_requests", "must be >= 0")
        _require(self.k_min >= 1, "pacing.k_min", "must be >= 1")
        _require(self.k_max >= self.k_min, "pacing.k_max", f"must be >= pacing.k_min={self.k_min}")
        _require(0 <= self.shrink_below < 1, "pacing.shrink_below", "must be in [0, 1)")
        _require(self.statistic in PACING_STATISTICS, "pacing.statistic",
                 f"must be one of {PACING_STATISTICS}, got {self.statistic!r}")


@dataclass(frozen=True)
class StepConfig:
    """How a scalar round's estimate is scaled before the optimizer (:mod:`aggregator.step_rule`).

    ``probe_scaling = "budget"``: multiply by ``P / (P + effective_dim)`` for the round's ``P``
    probes (``effective_dim`` 0: the number of trainables), so ``optimizer.lr`` is an exact-gradient
    rate and a round's step grows with its probe budget. ``normalize = "std"``: divide by the
    standard deviation of the round's ``d_k`` (FZOO), so the step's length along the gradient is
    about ``lr`` whatever the loss's scale.
    """

    normalize: str = "none"
    probe_scaling: str = "none"
    effective_dim: int = 0

    def __post_init__(self) -> None:
        _require(self.normalize in STEP_NORMALIZE, "step.normalize",
                 f"must be one of {STEP_NORMALIZE}, got {self.normalize!r}")
        _require(self.probe_scaling in STEP_PROBE_SCALING, "step.probe_scaling",
                 f"must be one of {STEP_PROBE_SCALING}, got {self.probe_scaling!r}")
        _require(self.effective_dim >= 0, "step.effective_dim",
                 f"must be >= 0 (0: the number of trainables), got {self.effective_dim}")


@dataclass(frozen=True)
class ValidationConfig:
    """Bounds every upload must respect."""

    max_abs_derivative: float = 1e4  # |d_k|
    max_abs_value: float = 1e6  # entries of dense gradients / FedAvg weights

    def __post_init__(self) -> None:
        _positive(self.max_abs_derivative, "validation.max_abs_derivative")
        _positive(self.max_abs_value, "validation.max_abs_value")


@dataclass(frozen=True)
class RobustConfig:
    """Robust aggregation: ``clip`` scales each device's derivative vector to L2 norm <= ``clip``;
    ``trimmed_mean`` and ``median`` are per-seed statistics and need shared seeds."""

    method: str = "none"
    clip: float = 0.0
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(self.method in ROBUST_METHODS, "robust.method", f"must be one of {ROBUST_METHODS}")
        _require(self.method != "clip" or self.clip > 0, "robust.clip", "must be > 0 when robust.method = 'clip'")
        _require(0 <= self.trim_fraction < 0.5, "robust.trim_fraction", "must be in [0, 0.5)")


@dataclass(frozen=True)
class LocalConfig:
    """Local training for modes that train on the device (``fedavg``): sent with every task.

    ``lr`` is the local learning rate of the first round (0: each device uses its own default);
    ``lr_schedule`` decays it over ``rounds.num_rounds`` towards ``final_lr_ratio * lr``
    (:func:`fwdfleet.lr_schedule.round_lr`), computed here and carried by each round's task.
    ``steps`` local optimizer steps of ``rounds.batch_size`` examples, or (``steps = 0``)
    ``epochs`` passes over the local data. ``objective`` and ``mode`` choose the local objective
    and how its steps are computed (Forward-Forward: e.g. ``"symmetric"``, ``"closed_form"``);
    empty: the device's default.
    """

    lr: float = 0.0
    lr_schedule: str = "constant"
    final_lr_ratio: float = 0.0
    steps: int = 0
    epochs: int = 1
    objective: str = ""
    mode: str = ""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr >= 0, "local.lr", f"must be a finite number >= 0, got {self.lr}")
        _require(self.lr_schedule in LR_SCHEDULES, "local.lr_schedule", f"must be one of {LR_SCHEDULES}")
        _require(0 <= self.final_lr_ratio <= 1, "local.final_lr_ratio", "must be in [0, 1]")
        _require(self.steps >= 0, "local.steps", f"must be >= 0 (0: epochs), got {self.steps}")
        _require(self.epochs >= 1, "local.epochs", f"must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: no checkpoints (the Coordinator's checkpoint_dir argument wins)
    fsync_journal: bool = True  # fsync each accepted upload's journal line before acknowledging it


@dataclass(frozen=True)
class AggregatorConfig:
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    pacing: PacingConfig = field(default_factory=PacingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    mode: str = "scalar"
    master_seed: int = 0
    metrics_path: str | None = None

    def __post_init__(self) -> None:
        from fwdfleet.aggregator.modes import server_mode, server_mode_names  # the modes import this module

        _require(self.mode in server_mode_names(), "mode", f"must be one of {server_mode_names()}, got {self.mode!r}")
        _require(0 <= self.master_seed < 1 << 64, "master_seed", "must be an unsigned 64-bit integer")
        server_mode(self.mode).check_config(self)
        if self.pacing.enabled:
            _require(
                self.pacing.k_min <= self.perturbation.k <= self.pacing.k_max,
                "perturbation.k",
                f"must lie in [pacing.k_min, pacing.k_max] = [{self.pacing.k_min}, {self.pacing.k_max}]",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS: dict[str, type] = {
    "rounds": RoundsConfig,
    "perturbation": PerturbationConfig,
    "optimizer": OptimizerConfig,
    "pacing": PacingConfig,
    "step": StepConfig,
    "validation": ValidationConfig,
    "robust": RobustConfig,
    "checkpoint": CheckpointConfig,
    "local": LocalConfig,
}
_TOP_LEVEL = ("mode", "master_seed", "metrics_path")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``"section.key=value"`` overrides applied."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. rounds.deadline_s=30")
        path = key.strip().split(".")
        target = out
        for part in path[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a table")
            target = nxt
        target[path[-1]] = _parse_value(value.strip())
    return out


def _typed(section: str, cls: type, table: Mapping[str, Any]) -> dict[str, Any]:
    """Check each value against its field's default type (TOML ints are accepted as floats)."""
    out: dict[str, Any] = {}
    defaults = {f.name: f.default for f in fields(cls)}
    for key, value in table.items():
        default = defaults[key]
        name = f"{section}.{key}" if section else key
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:  # str, or str | None
            ok = isinstance(value, str) or (default is None and value is None)
        if not ok:
            kind = type(default).__name__ if default is not None else "str"
            raise ConfigError(f"{name} must be a {kind}, got {value!r}")
        out[key] = value
    return out


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> AggregatorConfig:
    """Build a validated config; unknown top-level tables (e.g. ``[server]``) are ignored."""
    kwargs: dict[str, Any] = {}
    try:
        for name, cls in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"[{name}] must be a table")
            error = unknown_keys_error(f"[{name}]", table, (f.name for f in fields(cls)))
            if error is not None:
                raise error
            kwargs[name] = cls(**_typed(name, cls, table))
        kwargs.update(_typed("", AggregatorConfig, {k: data[k] for k in _TOP_LEVEL if k in data}))
        return AggregatorConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from e


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> AggregatorConfig:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {p}; pass an existing .toml file") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
    return config_from_dict(apply_overrides(data, overrides), source=source)
