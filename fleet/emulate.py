"""In-process fleet emulation: many virtual devices against the real aggregator Coordinator.

The transport is the Coordinator's own API (``join``, ``task_for``, ``submit_upload``): the same
calls the gRPC servicer makes, so emulation exercises the real round logic, validation, pacing,
upload modes and optimizer. Each virtual device computes its upload with the device worker a phone
runs (:class:`~fwdfleet.device_runtime.worker.DeviceWorker`: the task's upload mode, every
hyperparameter from the task); a small pool of worker processes (or Ray actors), each holding one
session and the training data, serves many virtual devices in turn.

A refused upload is an error with its cause (:class:`EmulationError`), except the refusals a real
device meets in a healthy fleet (its round closed or restarted before the upload arrived), which
drop the upload as a device would. A mode the bundle cannot run is refused before the first round.

Time is simulated: the Coordinator reads a clock this module advances. A device's round takes
``profile.round_seconds(measured compute, bytes down, bytes up)``; results arrive in that order,
late ones miss the deadline, dropouts never arrive. So a report can say what a run would take on
a fleet of such phones, next to what it took on this desktop.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from typing import Any, Protocol

import numpy as np

from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.records import DeviceProfile
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import Evaluation, evaluate
from fwdfleet.device_runtime.worker import DeviceWorker, WorkerDefaults
from fwdfleet.errors import FwdfleetError
from fwdfleet.fleet.keep import ModelKeeper
from fwdfleet.fleet.profiles import EmulatedProfile, SimulatedClock
from fwdfleet.protocol import serde
from fwdfleet.task import RoundTask, Upload

BACKENDS = ("process", "ray")
# what a device in a healthy fleet may be told: its round closed or restarted first (it drops the upload)
DROPPED = frozenset({RejectCode.STALE_ROUND, RejectCode.NOT_SELECTED})


class EmulationError(FwdfleetError):
    """The aggregator refused an emulated device's upload for a reason no healthy run meets."""


@dataclass(frozen=True)
class EmulationSettings:
    rounds: int = 20
    workers: int = 1  # processes computing device results; 1 = in this process
    eval_every: int = 1
    eval_batch: int = 256
    seed: int = 0
    threads_per_worker: int = 1
    max_idle_steps: int = 1000  # give up after this many loop turns without progress
    backend: str = "process"  # "process": worker processes here; "ray": Ray actors (fleet.ray_backend)
    ray_address: str = ""  # backend "ray": "" starts a local Ray; "auto" or "ray://host:10001" joins a cluster

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"EmulationSettings.rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ValueError(f"EmulationSettings.workers must be >= 1, got {self.workers}")
        if self.eval_every < 0:
            raise ValueError("EmulationSettings.eval_every must be >= 0 (0: only at the end)")
        if self.backend not in BACKENDS:
            raise ValueError(f"EmulationSettings.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads_per_worker < 0:
            raise ValueError(f"EmulationSettings.threads_per_worker must be >= 0, got {self.threads_per_worker}")

    def bound(self, config: AggregatorConfig) -> AggregatorConfig:
        """``config`` whose coordinator stops after this emulation's rounds (unless it sets its own limit).

        Both transports run the same coordinator: devices get no task past the last round, and a
        linear lr schedule without ``total_steps`` decays over the emulated rounds."""
        if config.rounds.num_rounds:
            return config
        return replace(config, rounds=replace(config.rounds, num_rounds=self.rounds))


@dataclass
class RoundRecord:
    """What one applied round did, for the JSON lines and the report."""

    round_id: int
    model_version: int
    participants: int
    dropouts: int
    stragglers: int
    k: int
    extra_requests: int
    noise_ratio: float | None
    loss: float | None  # test loss of the global model after the round (when evaluated)
    accuracy: float | None
    bytes_up: int  # real protobuf bytes of the uploads, all devices
    bytes_up_per_device: float  # mean over the devices that uploaded this round
    bytes_down: int
    sim_time_s: float  # simulated fleet clock at the end of the round
    wall_time_s: float
    pacing: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None  # the devices' own loss this round, weighted by their sample counts
    macro_f1: float | None = None  # test macro-F1 of the global model after the round (when evaluated)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- device compute


class _DeviceShard:
    """One virtual device's local data: its indices into the shared training set."""

    def __init__(self, data: Any, indices: np.ndarray) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return int(self.indices.size)

    def batch(self, seed: int, size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        pick = rng.choice(self.indices.size, size=size, replace=size > self.indices.size)
        return dict(self.data.take(self.indices[np.sort(pick)]))


class DeviceCompute:
    """A worker's state: one :class:`DeviceWorker` (one onnxruntime session) and every device's shard."""

    def __init__(self, bundle_path: str, train: RawData, shards: list[np.ndarray], threads: int,
                 defaults: WorkerDefaults | None = None) -> None:
        self.bundle = load_bundle(bundle_path, verify=False)
        self.session = BundleSession(self.bundle, SessionOptions(intra_op_threads=threads, inter_op_threads=1))
        self.worker = DeviceWorker(self.bundle, self.session, defaults)
        data = dataset_for_bundle(train, self.bundle)
        self.shards = [_DeviceShard(data, s) for s in shards]

    @property
    def version(self) -> int:
        return self.worker.version

    def run(self, version: int, trainables: Mapping[str, np.ndarray] | None,
            jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]:
        if trainables is not None:
            self.worker.set_model(version, dict(trainables))
        return [(device, self.worker.run(task, self.shards[device])) for device, task in jobs]


_WORKER: DeviceCompute | None = None


def _init_worker(bundle_path: str, train: RawData, shards: list[np.ndarray], threads: int,
                 defaults: WorkerDefaults | None) -> None:
    global _WORKER
    _WORKER = DeviceCompute(bundle_path, train, shards, threads, defaults)


def _run_in_worker(version: int, trainables: Mapping[str, np.ndarray] | None,
                   jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(version, trainables, jobs)


class ComputePool:
    """Runs device jobs in this process (workers=1) or in a pool of worker processes."""

    def __init__(self, bundle: Bundle, train: RawData, shards: list[np.ndarray], settings: EmulationSettings,
                 defaults: WorkerDefaults | None = None) -> None:
        self.workers = settings.workers
        args = (str(bundle.path), train, shards, settings.threads_per_worker, defaults)
        self._local: DeviceCompute | None = None
        self._pool: ProcessPoolExecutor | None = None
        if self.workers == 1:
            self._local = DeviceCompute(*args)
        else:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("fork"),
                                             initializer=_init_worker, initargs=args)

    def run(self, version: int, trainables: Mapping[str, np.ndarray],
            jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]:
        if self._local is not None:
            return self._local.run(version, trainables if self._local.version != version else None, jobs)
        assert self._pool is not None
        chunks = [jobs[i :: self.workers] for i in range(self.workers)]
        futures = [self._pool.submit(_run_in_worker, version, trainables, c) for c in chunks if c]
        return in_job_order(jobs, [r for f in futures for r in f.result()])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


class DevicePool(Protocol):
    """What the emulation loop needs from a backend computing device results."""

    def run(self, version: int, trainables: Mapping[str, np.ndarray],
            jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]: ...

    def close(self) -> None: ...


def in_job_order(jobs: list[tuple[int, RoundTask]],
                 results: list[tuple[int, Upload]]) -> list[tuple[int, Upload]]:
    """Results in the order of their jobs, whatever worker computed them (keeps runs identical across pools)."""
    by_device = dict(results)
    return [(device, by_device[device]) for device, _ in jobs]


def make_pool(bundle: Bundle, train: RawData, shards: list[np.ndarray], settings: EmulationSettings,
              defaults: WorkerDefaults | None = None) -> DevicePool:
    """The compute backend ``settings.backend`` names."""
    if settings.backend == "ray":
        from fwdfleet.fleet.ray_backend import RayComputePool  # optional: needs the `ray` extra

        return RayComputePool(bundle, train, shards, settings, defaults)
    return ComputePool(bundle, train, shards, settings, defaults)


# ------------------------------------------------------------------------------- the loop


def emulate(
    bundle: Bundle,
    config: AggregatorConfig,
    train: RawData,
    shards: list[np.ndarray],
    profiles: list[EmulatedProfile],
    settings: EmulationSettings,
    *,
    test: RawData | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    evaluator: Callable[[Mapping[str, np.ndarray]], tuple[float, float]] | None = None,
    defaults: WorkerDefaults | None = None,
    on_done: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> Generator[RoundRecord, None, None]:
    """Run ``settings.rounds`` applied rounds; yields one :class:`RoundRecord` per applied round.

    ``evaluator`` (default: test loss and accuracy of the bundle's graph on ``test``) scores the
    global trainables; ``defaults`` fill what the tasks leave open (the devices' own settings);
    ``on_done`` receives the final model version and trainables after the last round."""
    if len(shards) != len(profiles):
        raise ValueError(f"{len(shards)} data shards but {len(profiles)} device profiles")
    clock = SimulatedClock()
    coordinator = Coordinator(settings.bound(config), bundle, clock=lambda: clock.now_s)  # refuses a bad mode
    rng = np.random.default_rng(settings.seed)
    ids = [f"device-{i:05d}" for i in range(len(shards))]
    for dev_id, p, shard in zip(ids, profiles, shards):
        coordinator.join(dev_id, DeviceProfile(platform=p.name, ram_mb=p.memory_cap_mb, compute_speed=p.compute_speed,
                                               num_samples=int(np.asarray(shard).size)))
    pool = make_pool(bundle, train, shards, settings, defaults)
    if evaluator is None and test is not None:
        evaluator = Evaluator(bundle, test, settings.eval_batch)
    start = time.perf_counter()
    synced_version = dict.fromkeys(ids, -1)
    tally = _RoundTally()
    idle = 0
    online_for: tuple[int, int] = (-1, -1)
    online: list[int] = []
    try:
        while coordinator.status().rounds_completed < settings.rounds:
            status = coordinator.status()
            if (status.round_id, status.attempt) != online_for:  # who is online is drawn once per round
                online_for = (status.round_id, status.attempt)
                online = [i for i, p in enumerate(profiles) if rng.random() < p.availability]
            for i in online:
                coordinator.heartbeat(ids[i])
            tally.note(coordinator.advance())
            tasks = [(i, t) for i in online if (t := coordinator.task_for(ids[i])) is not None]
            if not tasks:
                idle += 1
                if idle > settings.max_idle_steps:
                    raise RuntimeError("the emulated round made no progress; check rounds.min_devices and availability")
                deadline = coordinator.status().deadline
                clock.now_s = max(clock.now_s + 1.0, deadline or 0.0)
                tally.note(coordinator.advance())
                yield from _flush(tally, coordinator, evaluator, clock, start, settings, on_round)
                continue
            idle = 0
            version, trainables = coordinator.current_trainables()
            t0 = time.perf_counter()
            results = pool.run(version, trainables, tasks)
            per_device_s = (time.perf_counter() - t0) * max(1, settings.workers) / len(tasks)
            round_start = clock.now_s
            arrivals = []
            for i, computed in results:
                res = Upload(computed.result.for_upload(), computed.vector)  # what a device sends: no diagnostics
                down = 96 + (4 * bundle.manifest.num_trainable if synced_version[ids[i]] != version else 0)
                synced_version[ids[i]] = version
                up = len(serde.upload_request(ids[i], res, config.mode)[1])
                sim = profiles[i].round_seconds(per_device_s, down, up)
                tally.bytes_down += down
                if rng.random() < profiles[i].dropout:
                    tally.dropouts += 1
                    continue
                arrivals.append((sim, i, res, up))
            deadline = coordinator.status().deadline or math.inf
            for sim, i, res, up in sorted(arrivals, key=lambda a: a[0]):
                clock.now_s = round_start + sim
                if clock.now_s > deadline:
                    tally.stragglers += 1
                try:
                    coordinator.submit_upload(ids[i], res)
                    tally.bytes_up += up
                    tally.per_device_up.append(up)
                except RejectedError as e:
                    if e.code not in DROPPED:
                        raise EmulationError(f"the aggregator refused the upload of {ids[i]} for round "
                                             f"{res.result.round_id} (mode {config.mode!r}): {e}") from e
                tally.note(coordinator.advance())
            yield from _flush(tally, coordinator, evaluator, clock, start, settings, on_round)
        if on_done is not None:
            on_done(*coordinator.current_trainables())
    finally:
        pool.close()


@dataclass
class _RoundTally:
    dropouts: int = 0
    stragglers: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    per_device_up: list[int] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    extra_requests: int = 0
    k: int = 0

    def note(self, events: list[Any]) -> None:
        for e in events:
            if e.kind == "round_opened":
                self.k = int(e.detail.get("k", self.k))
            elif e.kind == "extra_requested":
                self.extra_requests += 1
            elif e.kind == "update_applied":
                self.applied.append(dict(e.detail))


class Evaluator:
    """Test loss, accuracy, macro-F1 and the confusion matrix of a set of trainables (one onnxruntime
    session), on the whole test split; each evaluation is offered to ``keeper`` (final/ and best/)."""

    def __init__(self, bundle: Bundle, test: RawData, batch: int, keeper: ModelKeeper | None = None) -> None:
        self.session = BundleSession(bundle, SessionOptions(intra_op_threads=0))
        self.data = dataset_for_bundle(test, bundle)
        self.batch = batch
        self.keeper = keeper

    def evaluate(self, trainables: Mapping[str, np.ndarray], version: int = 0) -> Evaluation:
        ev = evaluate(self.session, trainables, self.data.batches(self.batch), step=version)
        if self.keeper is not None:
            self.keeper.offer(version, trainables, ev)
        return ev

    def __call__(self, trainables: Mapping[str, np.ndarray]) -> tuple[float, float]:
        ev = self.evaluate(trainables)
        return ev.loss, ev.accuracy


def _flush(tally: _RoundTally, coordinator: Coordinator,
           evaluator: Callable[[Mapping[str, np.ndarray]], tuple[float, float]] | None, clock: SimulatedClock,
           start: float, settings: EmulationSettings, on_round: Callable[[RoundRecord], None] | None,
           ) -> Iterator[RoundRecord]:
    """Turn every applied update since the last flush into a RoundRecord."""
    while tally.applied:
        detail = tally.applied.pop(0)
        version = int(detail["model_version"])
        loss = acc = f1 = None
        if evaluator is not None and (
            (settings.eval_every and version % settings.eval_every == 0) or version >= settings.rounds
        ):
            if isinstance(evaluator, Evaluator):
                ev = evaluator.evaluate(coordinator.current_trainables()[1], version)
                loss, acc, f1 = ev.loss, ev.accuracy, ev.macro_f1
            else:
                loss, acc = evaluator(coordinator.current_trainables()[1])
        noise = detail.get("noise_ratio")
        rec = RoundRecord(
            round_id=int(detail["round_id"]), model_version=version, participants=int(detail["participants"]),
            dropouts=tally.dropouts, stragglers=tally.stragglers, k=tally.k, extra_requests=tally.extra_requests,
            noise_ratio=float(noise) if noise is not None and math.isfinite(noise) else None,
            loss=loss, accuracy=acc, bytes_up=tally.bytes_up, bytes_down=tally.bytes_down,
            bytes_up_per_device=float(np.mean(tally.per_device_up)) if tally.per_device_up else 0.0,
            sim_time_s=clock.now_s, wall_time_s=time.perf_counter() - start,
        )
        rec.pacing = [{"next_k": detail.get("next_k")}]
        rec.macro_f1 = f1 if f1 is not None and math.isfinite(f1) else None
        train_loss = detail.get("loss_mean")
        rec.train_loss = float(train_loss) if train_loss is not None and math.isfinite(train_loss) else None
        tally.dropouts = tally.stragglers = tally.bytes_up = tally.bytes_down = tally.extra_requests = 0
        tally.per_device_up.clear()
        if on_round is not None:
            on_round(rec)
        yield rec


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))
