"""``dense``: FwdLLM's dense forward gradient ``mean_k d_k z_k`` over every trainable, one vector up."""

from __future__ import annotations

from dataclasses import replace

from fwdfleet.device_runtime.estimator import dense_gradient, estimate
from fwdfleet.device_runtime.worker import DeviceData, DeviceWorker
from fwdfleet.task import RoundTask, Upload


class DenseMode:
    name = "dense"
    carries = "vector"

    def check(self, worker: DeviceWorker) -> None:
        worker.require_every_trainable(self.name)

    def compute(self, worker: DeviceWorker, task: RoundTask, data: DeviceData) -> Upload:
        batch = data.batch(task.data_seed, task.batch_size)
        guide = worker.guide() if task.candidate_ratio > 1 else None
        result = estimate(worker.session, worker.trainables, batch, task, guide, workspace=worker.workspace)
        gradient = dense_gradient(result, task, worker.bundle.manifest.num_trainable)  # zeros if all were skipped
        return Upload(replace(result, indices=(), derivatives=()), gradient)


MODE = DenseMode()
