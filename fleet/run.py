"""Run a fleet emulation from a :class:`fleet.config.FleetConfig`: model, data, devices, report.

This is what ``fwdfleet fleet emulate`` and ``fwdfleet demo`` call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.aggregator.modes import server_mode
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.device_runtime.memory import measure_memory
from fwdfleet.errors import ConfigError
from fwdfleet.fleet.config import FleetConfig
from fwdfleet.fleet.datasets import load_split
from fwdfleet.fleet.emulate import EmulationSettings, Evaluator, RoundRecord, emulate
from fwdfleet.fleet.keep import ModelKeeper
from fwdfleet.fleet.models import export_for_data
from fwdfleet.fleet.partition import label_histogram, partition, plot_label_distribution
from fwdfleet.fleet.profiles import assign_profiles
from fwdfleet.fleet.report import can_plot, write_report


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    rounds: int
    trainable_parameters: int
    initial_accuracy: float | None
    final_accuracy: float | None
    initial_macro_f1: float | None
    final_macro_f1: float | None
    uplink_bytes_per_device_per_round: float
    uplink_bytes_per_device_total: float
    dense_update_bytes: int  # what one float32 update of the trainables would take, for comparison
    peak_rss_inference_mb: float | None
    peak_rss_train_step_mb: float | None
    wall_seconds: float
    simulated_fleet_seconds: float  # in-process: the simulated phone/Pi clock; grpc: real elapsed time
    transport: str
    initial_bundle: str  # the model before training
    final_bundle: str | None  # the trained model after the last round (None: no round was evaluated)
    best_bundle: str | None  # the evaluated model best by best_metric
    best_metric: str
    best_model_version: int | None
    final_metrics: dict[str, Any] | None  # the final model on the test split: per-class figures, confusion matrix
    interrupted: bool
    report: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prepare_bundle(cfg: FleetConfig, out_dir: Path, num_features: int, num_classes: int,
                   labels: tuple[str, ...]) -> Bundle:
    """``model.bundle``, or a bundle of kind ``model.export`` sized for the data in ``out_dir/initial``."""
    if cfg.model.bundle:
        return load_bundle(cfg.model.bundle)
    names = labels if len(labels) == num_classes else tuple(str(i) for i in range(num_classes))
    return export_for_data(cfg.model.export, cfg.model.options, cfg.model.hidden, out_dir / "initial",
                           num_features=num_features, labels=names, seed=cfg.fleet.seed)


def run_fleet(cfg: FleetConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> FleetSummary:
    start = time.perf_counter()
    out_dir = Path(cfg.fleet.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_split(cfg.dataset)
    if data.train.labels is None:
        raise ConfigError("the training data has no labels")
    features = data.train.features.shape[1] if data.train.features is not None else 0
    bundle = prepare_bundle(cfg, out_dir, features, data.num_classes, data.label_names)
    log(f"bundle     {bundle.path} ({bundle.manifest.kind}, {bundle.manifest.num_trainable:,} trainable values)")
    try:  # a mode the model kind cannot run is refused before any training
        server_mode(cfg.aggregator.mode).check_bundle(bundle.manifest)
    except ConfigError as e:
        raise ConfigError(f"aggregator.mode {cfg.aggregator.mode!r} cannot train model {bundle.manifest.kind!r}: "
                          f"{e}") from e
    local = cfg.aggregator.local
    if cfg.aggregator.mode == "fedavg" and bundle.manifest.kind == "ff_mlp":  # the devices' FF objective and mode
        from fwdfleet.device_runtime.ff_train import FFTrainConfig

        try:
            chosen: dict[str, Any] = {k: v for k, v in (("objective", local.objective), ("mode", local.mode)) if v}
            FFTrainConfig(**chosen)
        except ValueError as e:
            raise ConfigError(f"[aggregator.local] for an ff_mlp model: {e}") from e
    shards = partition(data.train.labels, cfg.partition)
    hist = label_histogram(data.train.labels, shards, data.num_classes)
    labels_png = ([Path(plot_label_distribution(hist, str(out_dir / "labels.png"),
                                                f"{cfg.partition.scheme} partition of {cfg.dataset.name}"))]
                  if can_plot() else [])
    profiles = assign_profiles(cfg.fleet.devices, cfg.fleet.profiles, seed=cfg.fleet.seed)
    settings = EmulationSettings(rounds=cfg.fleet.rounds, workers=cfg.fleet.workers,
                                 eval_every=cfg.fleet.eval_every, seed=cfg.fleet.seed,
                                 backend=cfg.fleet.backend, ray_address=cfg.fleet.ray_address)
    log(f"fleet      {cfg.fleet.devices} devices ({cfg.partition.scheme}), {cfg.fleet.rounds} rounds, "
        f"K={cfg.aggregator.perturbation.k}, mode {cfg.aggregator.mode}, transport {cfg.fleet.transport}")

    initial = Evaluator(bundle, data.test, 256).evaluate(bundle.load_trainables())
    keeper = ModelKeeper(bundle, out_dir, cfg.fleet.best_metric)
    evaluator = Evaluator(bundle, data.test, 256, keeper)
    records: list[RoundRecord] = []
    bar = _bar(cfg.fleet.rounds, progress)
    rounds: Generator[RoundRecord, None, None]
    device_uplink: list[int] = []  # grpc transport: the bytes each device process counted itself
    if cfg.fleet.transport == "grpc":
        from fwdfleet.fleet.grpc_fleet import emulate_grpc

        rounds = emulate_grpc(bundle, cfg.aggregator, data.train, shards, profiles, settings, out_dir / "grpc",
                              test=data.test, keeper=keeper, on_stop=lambda fleet: device_uplink.extend(
                                  s.uplink_bytes for s in fleet.device_stats.values() if s is not None))
    else:
        rounds = emulate(bundle, cfg.aggregator, data.train, shards, profiles, settings, evaluator=evaluator)
    interrupted = False
    try:
        with closing(rounds):  # stops worker or device processes at once, also on error and Ctrl-C
            for rec in rounds:
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                    if rec.accuracy is not None:
                        bar.set_postfix(acc=f"{100 * rec.accuracy:.1f}%", up=f"{rec.bytes_up_per_device:.0f}B")
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted after {len(records)} rounds; writing the last evaluated model and a summary")
    finally:
        if bar is not None:
            bar.close()
    kept = keeper.write()

    memory: dict[str, float | None] = {}
    if cfg.fleet.measure_memory and not interrupted:
        rep = measure_memory(bundle.path, batch_size=cfg.aggregator.rounds.batch_size,
                             num_perturbations=cfg.aggregator.perturbation.k, modes=("inference", "train"))
        memory = {f"onnxruntime {f.mode}": f.peak_mb for f in rep.figures}
    final = next((r.accuracy for r in reversed(records) if r.accuracy is not None), None)
    per_round = [r.bytes_up_per_device for r in records if r.bytes_up_per_device]
    participation = sum(r.participants for r in records) / max(1, cfg.fleet.devices)
    summary = FleetSummary(
        devices=cfg.fleet.devices,
        rounds=len(records),
        trainable_parameters=bundle.manifest.num_trainable,
        initial_accuracy=initial.accuracy,
        final_accuracy=final,
        initial_macro_f1=_finite(initial.macro_f1),
        final_macro_f1=_finite(keeper.final.evaluation.macro_f1) if keeper.final is not None else None,
        uplink_bytes_per_device_per_round=float(np.mean(per_round)) if per_round else 0.0,
        uplink_bytes_per_device_total=(sum(device_uplink) if device_uplink else sum(r.bytes_up for r in records))
        / max(1, cfg.fleet.devices),
        dense_update_bytes=4 * bundle.manifest.num_trainable,
        peak_rss_inference_mb=memory.get("onnxruntime inference"),
        peak_rss_train_step_mb=memory.get("onnxruntime train"),
        wall_seconds=time.perf_counter() - start,
        simulated_fleet_seconds=records[-1].sim_time_s if records else 0.0,
        transport=cfg.fleet.transport,
        initial_bundle=str(bundle.path),
        final_bundle=kept["final"]["bundle"] if "final" in kept else None,
        best_bundle=kept["best"]["bundle"] if "best" in kept else None,
        best_metric=cfg.fleet.best_metric,
        best_model_version=kept["best"]["model_version"] if "best" in kept else None,
        final_metrics=(keeper.final.evaluation.to_json(bundle.manifest.labels)
                       if keeper.final is not None else None),
        interrupted=interrupted,
        report=str(out_dir / "report.html"),
    )
    table = {k: v for k, v in summary.to_json().items() if k not in ("report", "final_metrics")}
    table["rounds taken part in, per device (mean)"] = round(participation, 1)
    table["uplink_bytes_whole_fleet"] = summary.uplink_bytes_per_device_total * cfg.fleet.devices
    write_report(out_dir, f"fwdfleet: {cfg.dataset.name}, {cfg.fleet.devices} devices", records, table,
                 memory, extra_images=labels_png, initial=(initial.accuracy, _finite(initial.macro_f1)),
                 full_axis=cfg.fleet.report_full_axis)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="rounds", unit="round", dynamic_ncols=True)
