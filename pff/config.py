"""A PFF run's settings (what every node process reads from ``plan.json``) and each node's data.

The plan is plain JSON (no pickle) written by the coordinator (:mod:`pff.run`) next to the
exported bundle; a node process needs nothing else besides the store's address.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fwdfleet.device_runtime.ff_objectives import NEGATIVES, OBJECTIVE_HEAD, OBJECTIVES, Negatives, Objective
from fwdfleet.device_runtime.ff_train import FFTrainConfig
from fwdfleet.errors import ConfigError
from fwdfleet.lr_schedule import LR_SCHEDULES, LrSchedule, round_lr
from fwdfleet.pff.schedule import MODES, Mode, Schedule

DATASETS = ("digits", "fashion-mnist")
RingAdam = Literal["hand-on", "restart"]
RING_ADAM: tuple[RingAdam, ...] = ("hand-on", "restart")


@dataclass(frozen=True)
class PFFConfig:
    """Everything that decides what a PFF run computes (runtime-only settings live elsewhere)."""

    mode: Mode = "all-layers"
    nodes: int = 2
    layers: tuple[int, ...] = (784, 500, 500, 500)
    epochs: int = 10
    splits: int = 10
    objective: Objective = "symmetric"
    negatives: Negatives = "random"
    # adaptive: sample the wrong label from softmax(goodness / T); 0 = the most-predicted wrong label (the
    # paper's AdaptiveNEG), which collapsed here (digits, 64-128-128: 16% vs 95% at T = 1)
    negative_temperature: float = 1.0
    lr: float = 3e-3
    batch_size: int = 64
    threshold: float = 1.0
    alpha: float = 4.0
    dataset: str = "digits"
    max_train: int = 0  # 0: the whole training split
    max_test: int = 0
    seed: int = 0
    # federated ring: hand Adam's moments on with the layer inside a chapter ("hand-on"), or let each
    # node restart Adam ("restart"); see docs/results/pff.md
    ring_adam: RingAdam = "hand-on"
    # Adam's learning rate per chapter: constant, or decaying from lr towards 0 over the chapters
    # (fwdfleet.lr_schedule.round_lr, the same in every mode)
    lr_schedule: LrSchedule = "constant"

    def __post_init__(self) -> None:
        checks = [
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("nodes", self.nodes >= 1, ">= 1"),
            ("layers", len(self.layers) >= 2 and all(int(d) >= 1 for d in self.layers),
             "an input width followed by >= 1 layer width"),
            ("objective", self.objective in OBJECTIVES, f"one of {OBJECTIVES}"),
            ("negatives", self.negatives in NEGATIVES, f"one of {NEGATIVES}"),
            ("negative_temperature", self.negative_temperature >= 0, ">= 0"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("dataset", self.dataset in DATASETS, f"one of {DATASETS}"),
            ("max_train", self.max_train >= 0, ">= 0"),
            ("max_test", self.max_test >= 0, ">= 0"),
            ("seed", 0 <= self.seed < 1 << 32, "an unsigned 32-bit integer"),
            ("ring_adam", self.ring_adam in RING_ADAM, f"one of {RING_ADAM}"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"PFFConfig.{name} must be {what}, got {getattr(self, name)!r}")
        try:
            self.schedule()
        except ValueError as e:
            message = str(e).replace("Schedule.num_nodes", "PFFConfig.nodes")
            message = message.replace("Schedule.num_layers", "PFFConfig.layers")
            raise ConfigError(message.replace("Schedule.", "PFFConfig.")) from e

    def schedule(self) -> Schedule:
        return Schedule(self.mode, len(self.layers) - 1, self.nodes, self.splits, self.epochs)

    @property
    def head(self) -> str:
        return OBJECTIVE_HEAD[self.objective]

    def train_config(self, chapter: int = 0) -> FFTrainConfig:
        """The device runtime's per-step settings (closed-form local gradients, Adam) in chapter
        ``chapter``: its learning rate follows ``lr_schedule`` over the ``splits`` chapters."""
        lr = round_lr(self.lr, chapter, self.splits, self.lr_schedule)
        return FFTrainConfig(objective=self.objective, negatives=self.negatives,
                             negative_temperature=self.negative_temperature, mode="closed_form",
                             optimizer="adam", lr=lr, batch_size=self.batch_size, threshold=self.threshold,
                             alpha=self.alpha, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PFFConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown PFF settings {unknown}; known: {sorted(known)}")
        values = dict(d)
        if "layers" in values:
            values["layers"] = tuple(int(x) for x in values["layers"])
        return cls(**values)


@dataclass(frozen=True)
class RunPlan:
    """What a node process is told: the run's config, the bundle folder and how to log."""

    config: PFFConfig
    bundle: str
    report_every: float = 0.5  # seconds between progress reports to the store

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps({"config": self.config.to_dict(), "bundle": self.bundle,
                                    "report_every": self.report_every}, indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, path: Path) -> RunPlan:
        try:
            d = json.loads(Path(path).read_text())
            return cls(PFFConfig.from_dict(d["config"]), str(d["bundle"]), float(d.get("report_every", 0.5)))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the PFF plan {path} ({e}); rerun `fwdfleet pff run`") from e


@dataclass(frozen=True)
class NodeData:
    """A node's training examples (raw inputs, labels, and their indices in the full training split)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray


def load_data(config: PFFConfig) -> tuple[NodeData, NodeData]:
    """The (train, test) splits of ``config.dataset`` (the fleet's named datasets, read by the device runtime)."""
    from fwdfleet.fleet.datasets import DatasetConfig, load_split

    split = load_split(DatasetConfig(name=config.dataset, max_train=config.max_train, max_test=config.max_test,
                                     seed=config.seed))
    out = []
    for raw in (split.train, split.test):
        if raw.features is None or raw.labels is None:
            raise ConfigError(f"dataset {config.dataset!r} has no numeric features and labels")
        x = np.ascontiguousarray(raw.features.reshape(raw.features.shape[0], -1), dtype=np.float32)
        if x.shape[1] != config.layers[0]:
            raise ConfigError(f"PFFConfig.layers[0] is {config.layers[0]} but {config.dataset} inputs have "
                              f"{x.shape[1]} features; use --layers {x.shape[1]},...")
        out.append(NodeData(x, raw.labels.astype(np.int64), np.arange(x.shape[0], dtype=np.int64)))
    return out[0], out[1]


def shard(data: NodeData, shard_index: int | None, num_shards: int, seed: int) -> NodeData:
    """IID shard ``shard_index`` of ``num_shards`` (a seeded permutation cut in equal parts); None: all."""
    if shard_index is None:
        return data
    order = np.random.default_rng([seed, 0x5A4D]).permutation(data.y.size)
    idx = np.sort(np.array_split(order, num_shards)[shard_index])
    return NodeData(data.x[idx], data.y[idx], data.ids[idx])
