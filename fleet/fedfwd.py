"""FedFwd: federated Forward-Forward training, run through the fleet emulation in ``fedavg`` mode.

FedFwd is not a loop of its own: :func:`run_fedfwd` configures the aggregator (mode ``fedavg``,
the local training as ``[local]`` settings the tasks carry) and runs :func:`fleet.emulate.emulate`.
Each round every selected device downloads the global FF-MLP trainables, trains every layer
locally on its shard (the ``fedavg`` device mode: :func:`device_runtime.ff_train.train_ff`,
layer-local objectives, closed-form gradients or perturbed inference of the layer graphs, no
backpropagation between layers) and uploads its weights; the coordinator applies
``w - mean_i(w_i)`` (weighted by the examples each device used) through its optimizer, and with
``sgd``/``lr = 1`` (the default config here) that is plain FedAvg of the layer weights.

Every setting a device needs travels in its task (learning rate of the round from the server-side
schedule, epochs or steps, batch size, objective, local mode, K, eps, seed), so the same run over
real gRPC devices gives the same weights (tests/test_engine_transports.py checks it bit for bit).
Every random choice derives from the aggregator's master seed: a device's local seed is its
task's ``data_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fwdfleet.aggregator.config import (
    AggregatorConfig,
    LocalConfig,
    OptimizerConfig,
    RoundsConfig,
)
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import RawData
from fwdfleet.device_runtime.ff import FFLayout, ScoreLayers
from fwdfleet.device_runtime.ff_train import FFTrainConfig, evaluate_ff
from fwdfleet.device_runtime.worker import WorkerDefaults
from fwdfleet.fleet.emulate import EmulationSettings, RoundRecord, emulate
from fwdfleet.fleet.profiles import EmulatedProfile
from fwdfleet.lr_schedule import LR_SCHEDULES, LrSchedule


@dataclass(frozen=True)
class FedFwdSettings:
    """How the federated run goes.

    ``lr_schedule`` / ``final_lr_ratio`` set each round's local learning rate from the training
    config's ``lr`` (:func:`fwdfleet.lr_schedule.round_lr`); the aggregator computes it and sends it
    with the round's task (``RoundTask.lr``).
    """

    rounds: int = 20
    eval_every: int = 1  # 0: evaluate only after the last round
    score_layers: ScoreLayers = "all"  # which layers' scores predict at evaluation
    eval_batch: int = 512
    lr_schedule: LrSchedule = "constant"
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"FedFwdSettings.rounds must be >= 1, got {self.rounds}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"FedFwdSettings.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"FedFwdSettings.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        if self.eval_every < 0:
            raise ValueError(f"FedFwdSettings.eval_every must be >= 0, got {self.eval_every}")
        if self.score_layers not in ("all", "all_but_first"):
            raise ValueError(f"FedFwdSettings.score_layers must be 'all' or 'all_but_first', got {self.score_layers!r}")
        if self.eval_batch < 1:
            raise ValueError(f"FedFwdSettings.eval_batch must be >= 1, got {self.eval_batch}")


@dataclass
class FedFwdRun:
    records: list[RoundRecord]  # one per applied round (accuracy/loss: the FF test evaluation)
    trainables: Mapping[str, np.ndarray]  # the aggregator's global model at the end
    local_steps: list[int] = field(default_factory=list)  # optimizer steps per layer of each device per round


def fedavg_config(num_devices: int, rounds: int, *, master_seed: int = 0, server_lr: float = 1.0,
                  fraction: float = 1.0) -> AggregatorConfig:
    """An aggregator config for FedAvg of weights: every round waits for ``ceil(fraction * devices)`` uploads."""
    target = max(1, int(np.ceil(fraction * num_devices)))
    return AggregatorConfig(
        mode="fedavg", master_seed=master_seed,
        rounds=RoundsConfig(fraction=fraction, min_devices=target, min_available=num_devices, min_results=1,
                            num_rounds=rounds, deadline_s=3600.0, max_extensions=0),
        optimizer=OptimizerConfig(name="sgd", lr=server_lr),
    )


def with_local_training(config: AggregatorConfig, train: FFTrainConfig, settings: FedFwdSettings) -> AggregatorConfig:
    """``config`` whose tasks carry ``train``'s local training and ``settings``' lr schedule."""
    return replace(
        config,
        rounds=replace(config.rounds, num_rounds=settings.rounds, batch_size=train.batch_size),
        perturbation=replace(config.perturbation, k=train.num_perturbations, eps=train.eps,
                             distribution=train.distribution),
        local=LocalConfig(lr=train.lr, lr_schedule=settings.lr_schedule, final_lr_ratio=settings.final_lr_ratio,
                          steps=train.max_steps or 0, epochs=train.epochs, objective=train.objective,
                          mode=train.mode),
    )


def run_fedfwd(
    bundle: Bundle,
    train_config: FFTrainConfig,
    x: np.ndarray,
    y: np.ndarray,
    shards: list[np.ndarray],
    settings: FedFwdSettings,
    *,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    aggregator: AggregatorConfig | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FedFwdRun:
    """Train ``bundle`` (kind ``ff_mlp``) federated over ``shards`` (index arrays into ``x``/``y``).

    ``train_config`` is each device's local training (the tasks carry it; its ``seed`` is each
    task's data seed). ``aggregator`` defaults to :func:`fedavg_config`; it must use mode ``fedavg``.
    """
    config = aggregator or fedavg_config(len(shards), settings.rounds)
    if config.mode != "fedavg":
        raise ValueError(f"run_fedfwd needs an aggregator in mode 'fedavg', got {config.mode!r}")
    if not shards or any(np.asarray(s).size == 0 for s in shards):
        raise ValueError("run_fedfwd needs at least one shard and no empty shards; repartition with min_samples >= 1")
    config = with_local_training(config, train_config, settings)
    layout = FFLayout.from_manifest(bundle.manifest)
    evaluator = None
    if test is not None:
        xt, yt = np.asarray(test[0], dtype=np.float32), np.asarray(test[1], dtype=np.int64)

        def evaluator(trainables: Mapping[str, np.ndarray]) -> tuple[float, float]:
            ev = evaluate_ff(layout, trainables, xt, yt, score_layers=settings.score_layers,
                             batch_size=settings.eval_batch)
            return ev.loss, ev.accuracy

    final: dict[str, np.ndarray] = {}
    train = RawData(labels=np.asarray(y, dtype=np.int64), features=np.asarray(x, dtype=np.float32))
    records = list(emulate(bundle, config, train, shards, [EmulatedProfile()] * len(shards),
                           EmulationSettings(rounds=settings.rounds, eval_every=settings.eval_every),
                           on_round=on_round, evaluator=evaluator, defaults=WorkerDefaults(ff_train=train_config),
                           on_done=lambda _version, w: final.update(w)))
    per_epoch = [max(1, math.ceil(np.asarray(s).size / train_config.batch_size)) for s in shards]
    steps = [min(train_config.max_steps or p * train_config.epochs, p * train_config.epochs) for p in per_epoch]
    return FedFwdRun(records, final, steps)
