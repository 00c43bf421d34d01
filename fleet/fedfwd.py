"""FedFwd: federated Forward-Forward training through the real aggregator in ``fedavg`` mode.

Each round every selected device downloads the global FF-MLP trainables, trains every layer
locally on its own shard with :func:`device_runtime.ff_train.train_ff` (layer-local objective,
closed-form gradients or perturbed inference of the layer graphs, no backpropagation between
layers) and uploads its weights with :meth:`aggregator.coordinator.Coordinator.submit_weights`.
The coordinator applies ``w - mean_i(w_i)`` (weighted by samples) through its optimizer; with
``sgd``/``lr = 1`` (the default config here) that is plain FedAvg of the layer weights.

The transport is the Coordinator's own API (``join``, ``task_for``, ``submit_weights``), as in
:mod:`fleet.emulate`; devices run one after another in this process (FF training is numpy and
single-threaded). Every random choice derives from the aggregator's master seed: a device's
local seed is its task's ``data_seed``.

Bytes: what a device would send over gRPC, the real serialized size of its upload
(``fwdfleet.protocol.serde.submit_vector_request``: its float32 trainables, about
``4 * num_trainable`` bytes, with the :class:`DeviceResult`'s metadata and a sha256).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, RoundsConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.errors import RejectedError
from fwdfleet.aggregator.records import DeviceProfile
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.ff import FFLayout, NumpyLayers, OnnxLayers, ScoreLayers
from fwdfleet.device_runtime.ff_train import AdamState, FFTrainConfig, evaluate_ff, train_ff
from fwdfleet.lr_schedule import LR_SCHEDULES, LrSchedule, round_lr
from fwdfleet.perturbation import flatten
from fwdfleet.protocol import serde
from fwdfleet.task import DeviceResult


@dataclass(frozen=True)
class FedFwdSettings:
    """How the federated run goes. ``keep_device_state`` keeps each device's Adam moments across rounds.

    ``lr_schedule`` / ``final_lr_ratio`` set each round's local learning rate from the training
    config's ``lr`` (:func:`round_lr`, recorded in ``FedFwdRecord.extras["local_lr"]``). Here the
    emulation hands it to each device's config; a deployment would send it with the round's task
    (:class:`~fwdfleet.task.RoundTask` has no field for it yet).
    """

    rounds: int = 20
    eval_every: int = 1  # 0: evaluate only after the last round
    score_layers: ScoreLayers = "all"  # which layers' scores predict at evaluation
    keep_device_state: bool = False
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
class FedFwdRecord:
    """One applied round."""

    round_id: int
    model_version: int
    participants: int
    accuracy: float | None  # test accuracy of the global model after this round
    test_loss: float | None
    train_loss: dict[str, float]  # sample-weighted mean of the devices' per-layer losses
    local_steps: int  # optimizer steps per layer, summed over devices
    bytes_up: int
    bytes_up_per_device: float
    device_seconds: float  # FF training compute, summed over devices
    wall_time_s: float
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FedFwdRun:
    records: list[FedFwdRecord]
    trainables: Mapping[str, np.ndarray]


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
    on_round: Callable[[FedFwdRecord], None] | None = None,
) -> FedFwdRun:
    """Train ``bundle`` (kind ``ff_mlp``) federated over ``shards`` (index arrays into ``x``/``y``).

    ``train_config`` is each device's local training (its ``seed`` is replaced per device and
    round). ``aggregator`` defaults to :func:`fedavg_config`; it must use mode ``fedavg``.
    Returns the records (one :class:`FedFwdRecord` per round) and the final global trainables.
    """
    config = aggregator or fedavg_config(len(shards), settings.rounds)
    if config.mode != "fedavg":
        raise ValueError(f"run_fedfwd needs an aggregator in mode 'fedavg', got {config.mode!r}")
    if not shards or any(np.asarray(s).size == 0 for s in shards):
        raise ValueError("run_fedfwd needs at least one shard and no empty shards; repartition with min_samples >= 1")
    layout = FFLayout.from_manifest(bundle.manifest)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    now = [0.0]
    coordinator = Coordinator(replace(config, rounds=replace(config.rounds, num_rounds=settings.rounds)), bundle,
                              clock=lambda: now[0])
    ids = [f"device-{i:05d}" for i in range(len(shards))]
    for dev_id in ids:
        coordinator.join(dev_id, DeviceProfile(platform="emulated"))
    runner = OnnxLayers(bundle) if train_config.mode == "perturbed" else NumpyLayers(layout)
    states: dict[int, AdamState] = {}
    records: list[FedFwdRecord] = []
    start = time.perf_counter()
    while coordinator.status().rounds_completed < settings.rounds:
        now[0] += 1.0
        version, weights = coordinator.current_trainables()
        tasks = [(i, t) for i, dev_id in enumerate(ids) if (t := coordinator.task_for(dev_id)) is not None]
        if not tasks:
            raise RuntimeError(f"round {coordinator.status().round_id} issued no task; check the aggregator config "
                               f"(min_devices={config.rounds.min_devices} for {len(ids)} devices)")
        losses: dict[str, float] = {}
        rejected: list[str] = []
        up = steps = samples = 0
        compute = 0.0
        lr = round_lr(train_config.lr, version, settings.rounds, settings.lr_schedule, settings.final_lr_ratio)
        for i, task in tasks:
            idx = np.asarray(shards[i])
            local = replace(train_config, seed=task.data_seed, lr=lr)
            res = train_ff(bundle, x[idx], y[idx], local, trainables=weights,
                           state=states.get(i) if settings.keep_device_state else None, runner=runner)
            if settings.keep_device_state:
                states[i] = res.state
            layer_losses = {k: v for k, v in res.metrics.items() if k.startswith("loss_layer_")}
            result = DeviceResult(round_id=task.round_id, model_version=task.model_version, indices=(),
                                  derivatives=(), num_samples=int(idx.size),
                                  loss_mean=float(np.mean(list(layer_losses.values()))) if layer_losses else 0.0,
                                  compute_seconds=res.metrics["seconds"])
            try:
                coordinator.submit_weights(ids[i], result, res.trainables)
            except RejectedError as e:  # e.g. a diverged device (non-finite or huge weights): it is left out
                rejected.append(f"{ids[i]}: {e}")
                continue
            for k, v in layer_losses.items():
                losses[k] = losses.get(k, 0.0) + v * idx.size
            samples += int(idx.size)
            steps += int(res.metrics["steps"])
            compute += res.metrics["seconds"]
            flat = flatten(res.trainables, bundle.manifest.trainables)
            up += len(serde.submit_vector_request(ids[i], result, "fedavg", flat))  # the real wire size
        if rejected:  # the round waits for uploads that will not come: let its deadline close it
            now[0] = coordinator.status().deadline or now[0]
        coordinator.advance()
        new_version, new_weights = coordinator.current_trainables()
        if new_version == version:
            raise RuntimeError(f"round {coordinator.status().round_id} did not close: {len(rejected)} of {len(tasks)} "
                               f"uploads were rejected ({'; '.join(rejected[:3])}); lower the local learning rate")
        last = new_version >= settings.rounds
        acc = loss = None
        if test is not None and (last or (settings.eval_every and new_version % settings.eval_every == 0)):
            ev = evaluate_ff(layout, new_weights, test[0], test[1], score_layers=settings.score_layers,
                             batch_size=settings.eval_batch)
            acc, loss = ev.accuracy, ev.loss
        rec = FedFwdRecord(
            round_id=new_version - 1, model_version=new_version, participants=len(tasks) - len(rejected), accuracy=acc,
            test_loss=loss, train_loss={k: v / samples for k, v in losses.items()}, local_steps=steps,
            bytes_up=up, bytes_up_per_device=up / max(1, len(tasks) - len(rejected)), device_seconds=compute,
            wall_time_s=time.perf_counter() - start,
            extras={"local_lr": lr, **({"rejected": rejected} if rejected else {})},
        )
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return FedFwdRun(records, coordinator.current_trainables()[1])
