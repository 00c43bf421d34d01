"""Spread the emulation's device compute over a Ray cluster (the optional ``ray`` extra).

:class:`RayComputePool` is a drop-in for :class:`fleet.emulate.ComputePool`: the emulation loop,
the real Coordinator and the simulated clock stay in this process; only the device results (the
perturbed forward passes, the expensive part) are computed by Ray actors, each holding one
onnxruntime session and the training data, exactly like a local worker process.

* ``ray_address = ""`` starts a local Ray instance (and shuts it down at the end);
  ``"auto"`` or ``"ray://head:10001"`` joins an existing cluster, whose nodes need fwdfleet
  installed (``pip install 'fwdfleet[ray]'``), the same version as here.
* The bundle travels as a zip through Ray's object store, so workers on other machines need no
  shared file system; so do the training data (once) and the trainables (once per model version).
* Jobs are split over the actors the same way as over local worker processes and the results come
  back in job order, so a run gives the same results on Ray as in-process.

Select it with ``EmulationSettings(backend="ray", ray_address=...)`` or ``fleet.backend = "ray"``
in the fleet TOML.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fwdfleet.bundle import Bundle, zip_bundle
from fwdfleet.device_runtime.data import RawData
from fwdfleet.device_runtime.worker import WorkerDefaults
from fwdfleet.errors import ConfigError
from fwdfleet.fleet.emulate import DeviceCompute, in_job_order
from fwdfleet.task import RoundTask, Upload

if TYPE_CHECKING:
    from fwdfleet.fleet.emulate import EmulationSettings


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "the Ray backend needs the ray package: pip install 'fwdfleet[ray]' (or choose fleet.backend = \"process\")"
        ) from e
    return ray


class _RayWorker:
    """A Ray actor's state: the bundle unpacked on its node, one session, every device's shard."""

    def __init__(self, bundle_zip: bytes, train: RawData, shards: list[np.ndarray], threads: int,
                 defaults: WorkerDefaults | None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="fwdfleet-ray-"))
        path = self._dir / "bundle.zip"
        path.write_bytes(bundle_zip)
        self.compute = DeviceCompute(str(path), train, shards, threads, defaults)

    def run(self, version: int, trainables: Mapping[str, np.ndarray] | None,
            jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]:
        return self.compute.run(version, trainables, jobs)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class RayComputePool:
    """Runs device jobs on ``settings.workers`` Ray actors (same interface as ``ComputePool``)."""

    def __init__(self, bundle: Bundle, train: RawData, shards: list[np.ndarray], settings: EmulationSettings,
                 defaults: WorkerDefaults | None = None) -> None:
        ray = self._ray = _import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=settings.ray_address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        threads = max(1, settings.threads_per_worker)
        try:
            cpus = float(ray.cluster_resources().get("CPU", 0.0))
            if cpus < settings.workers * threads:
                raise ConfigError(
                    f"the Ray cluster has {cpus:g} CPUs but fleet.workers={settings.workers} x "
                    f"{threads} thread(s) need {settings.workers * threads}; lower fleet.workers or add nodes"
                )
            with tempfile.TemporaryDirectory(prefix="fwdfleet-ray-zip-") as tmp:
                blob = zip_bundle(bundle, Path(tmp) / "bundle.zip").read_bytes()
            actor = ray.remote(num_cpus=threads)(_RayWorker)
            blob_ref, train_ref, shards_ref = ray.put(blob), ray.put(train), ray.put(shards)
            self._actors = [actor.remote(blob_ref, train_ref, shards_ref, threads, defaults)
                            for _ in range(settings.workers)]
            self._versions = [-1] * settings.workers
            self._trainables_ref: tuple[int, Any] = (-1, None)
        except BaseException:
            self._shutdown()
            raise

    def run(self, version: int, trainables: Mapping[str, np.ndarray],
            jobs: list[tuple[int, RoundTask]]) -> list[tuple[int, Upload]]:
        if self._trainables_ref[0] != version:
            self._trainables_ref = (version, self._ray.put(dict(trainables)))
        ref = self._trainables_ref[1]
        n = len(self._actors)
        pending = []
        for i, actor in enumerate(self._actors):
            chunk = jobs[i::n]
            if not chunk:
                continue
            pending.append(actor.run.remote(version, ref if self._versions[i] != version else None, chunk))
            self._versions[i] = version
        results = [r for part in self._ray.get(pending) for r in part]
        return in_job_order(jobs, results)

    def close(self) -> None:
        actors = getattr(self, "_actors", [])
        with contextlib.suppress(Exception):  # best effort: the actors are killed next anyway
            self._ray.get([a.close.remote() for a in actors], timeout=30)
        for a in actors:
            self._ray.kill(a)
        self._actors = []
        self._shutdown()

    def _shutdown(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
