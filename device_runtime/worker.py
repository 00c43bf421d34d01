"""The device worker: one task + local data + the bundle -> one upload. The same code everywhere.

:class:`DeviceWorker` is what a device runs for a round, wherever the device is: a phone or a
Raspberry Pi (:class:`~fwdfleet.device_runtime.client.DeviceClient` wraps it in the gRPC
protocol), an emulated device (:mod:`fwdfleet.fleet.emulate`: one worker serves many virtual
devices in turn, each with its own shard) and a Ray actor (:mod:`fwdfleet.fleet.ray_backend`).

What to compute is the task's upload mode (``task.upload_mode``, looked up in
:mod:`fwdfleet.device_runtime.modes`); every hyperparameter of the round (K, eps, batch size,
data seed, local learning rate, local steps or epochs, objective, local mode) comes from the
task, so the same task and data give the same upload on any device. What the task leaves open
(``lr = 0``, an empty objective) falls back to the worker's ``local_train`` / ``ff_train``
defaults.

With a split bundle (:mod:`fwdfleet.device_runtime.prefix_cache`) the worker trains on the
``suffix`` graph: the first time it sees a device's data it runs the frozen ``prefix`` once over
every example and keeps the features, so every perturbed forward of every later round runs only
the trainable top layers, with the same examples drawn from the same seeds.

The worker keeps the model between rounds: :meth:`DeviceWorker.set_model` installs a version's
trainables and remembers the previous version, whose difference guides discriminative sampling
(``candidate_ratio > 1``) when the two versions are consecutive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import Batch
from fwdfleet.device_runtime.estimator import EstimatorWorkspace
from fwdfleet.device_runtime.ff_train import FFTrainConfig
from fwdfleet.device_runtime.prefix_cache import cache_prefix, split_graphs
from fwdfleet.device_runtime.sampling import guide_from_versions
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.device_runtime.train import LocalTrainConfig
from fwdfleet.errors import ConfigError
from fwdfleet.modes import Carries, find_mode
from fwdfleet.perturbation import F32Array
from fwdfleet.task import RoundTask, Upload

Arrays = dict[str, npt.NDArray[Any]]


class DeviceData(Protocol):
    """A device's local examples: how many, and ``size`` of them drawn by ``seed`` (sorted; all of
    them, in order, when ``size`` is the length)."""

    def __len__(self) -> int: ...

    def batch(self, seed: int, size: int) -> Batch: ...


class DeviceMode(Protocol):
    """The device half of an upload mode (a module ``device_runtime/modes/<name>.py`` holding ``MODE``)."""

    name: str
    carries: Carries

    def check(self, worker: DeviceWorker) -> None:
        """Raise :class:`~fwdfleet.errors.ConfigError` when this worker's bundle cannot run the mode."""

    def compute(self, worker: DeviceWorker, task: RoundTask, data: DeviceData) -> Upload:
        """This device's upload for ``task`` from the worker's current model and ``data``."""


def device_mode(name: str) -> DeviceMode:
    return cast(DeviceMode, find_mode("fwdfleet.device_runtime.modes", name))


@dataclass(frozen=True)
class WorkerDefaults:
    """What a task may leave open: the device's own local-training defaults."""

    local_train: LocalTrainConfig = field(default_factory=lambda: LocalTrainConfig(steps=10, eval_every=0))  # non-FF
    ff_train: FFTrainConfig = field(default_factory=FFTrainConfig)  # Forward-Forward bundles (kind ff_mlp)


class DeviceWorker:
    """See the module docstring. Not thread-safe: one worker per device thread or process."""

    def __init__(self, bundle: Bundle, session: BundleSession, defaults: WorkerDefaults | None = None) -> None:
        self.bundle = bundle
        self.split = split_graphs(bundle)
        if self.split is not None and session.graph.name != self.split[1]:
            session = BundleSession(bundle, session.options, graph=self.split[1])  # probes run the suffix only
        self.session = session
        self.defaults = defaults or WorkerDefaults()
        self.workspace = EstimatorWorkspace(session.trainable_specs)
        self.version = -1
        self.trainables: Arrays = {}
        self._previous: tuple[int, Arrays] | None = None
        self._guide: tuple[int, F32Array | None] | None = None
        self.cache: dict[str, Any] = {}  # what a mode keeps for this bundle (e.g. FF layer runners)
        self._features: dict[int, tuple[DeviceData, DeviceData]] = {}  # id(data) -> (data, its prefix features)

    def set_model(self, version: int, trainables: Arrays) -> None:
        """Install model ``version`` (a no-op if it is already installed)."""
        if version == self.version:
            return
        if self.version >= 0:
            self._previous = (self.version, self.trainables)
        self.trainables, self.version, self._guide = dict(trainables), version, None

    def guide(self) -> F32Array | None:
        """``w_t - w_{t-1}`` of the last two consecutive versions seen (None otherwise)."""
        if self._guide is None or self._guide[0] != self.version:
            prev = self._previous
            g = (guide_from_versions(self.trainables, prev[1], self.session.trainable_specs)
                 if prev is not None and prev[0] == self.version - 1 else None)
            self._guide = (self.version, g)
        return self._guide[1]

    def require_every_trainable(self, mode: str) -> None:
        """ConfigError unless the training graph takes every trainable of the bundle (what a mode
        that moves the whole model, such as dense or trajectory, needs)."""
        n = self.bundle.manifest.num_trainable
        if sum(t.size for t in self.session.trainable_specs) != n:
            raise ConfigError(f"mode {mode!r} needs a graph that takes every trainable of the bundle ({n} values); "
                              f"graph {self.session.graph.name!r} takes a subset: use mode 'scalar'")

    def check(self, mode: str) -> DeviceMode:
        """The device half of ``mode``, after checking this bundle can run it."""
        dm = device_mode(mode)
        dm.check(self)
        return dm

    def features(self, data: DeviceData) -> DeviceData:
        """``data`` as the training graph takes it: itself, or for a split bundle its cached prefix
        features (computed on first use, then kept for as long as the data object lives here)."""
        if self.split is None:
            return data
        held = self._features.get(id(data))
        if held is None or held[0] is not data:
            prefix = BundleSession(self.bundle, self.session.options, graph=self.split[0])
            held = (data, cache_prefix(self.bundle, data, session=prefix))
            self._features[id(data)] = held
        return held[1]

    def run(self, task: RoundTask, data: DeviceData) -> Upload:
        """The upload for ``task`` (its ``compute_seconds`` measured here) from the model last set."""
        start = time.perf_counter()
        upload = self.check(task.upload_mode).compute(self, task, self.features(data))
        seconds = time.perf_counter() - start
        # a count is of distinct local examples (a minibatch drawn with replacement from a small shard
        # repeats some): what the aggregator bounds by the shard size the device declared
        samples = min(upload.result.num_samples, len(data))
        return Upload(replace(upload.result, compute_seconds=seconds, num_samples=samples), upload.vector)


def flat_trainables(trainables: Arrays, bundle: Bundle) -> npt.NDArray[np.float32]:
    """The bundle's trainables as one float32 vector in the manifest's canonical order (what vector modes send)."""
    return np.concatenate([np.asarray(trainables[t.name], dtype=np.float32).reshape(-1)
                           for t in bundle.manifest.trainables])
