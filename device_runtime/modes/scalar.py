"""``scalar``: K central differences ``d_k`` on one minibatch, uploaded as ``(k, d_k)`` pairs."""

from __future__ import annotations

from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.worker import DeviceData, DeviceWorker
from fwdfleet.task import RoundTask, Upload


class ScalarMode:
    name = "scalar"
    carries = "scalars"

    def check(self, worker: DeviceWorker) -> None:
        pass  # any bundle with a loss graph (checked when its session was built)

    def compute(self, worker: DeviceWorker, task: RoundTask, data: DeviceData) -> Upload:
        batch = data.batch(task.data_seed, task.batch_size)
        guide = worker.guide() if task.candidate_ratio > 1 else None
        return Upload(estimate(worker.session, worker.trainables, batch, task, guide, workspace=worker.workspace))


MODE = ScalarMode()
