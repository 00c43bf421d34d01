"""``trajectory``: S local zeroth-order steps, their S x K ``(k, d_k)`` pairs up, no weights.

Step ``s`` of ``S = task.local_steps`` draws its minibatch with ``derive_seed(task.data_seed, s)``,
evaluates the probes ``k = task.k_start + s * K + j`` (``j`` in ``0..K-1``; the perturbation index
carries the step, so ``z`` is the usual Philox vector of ``(round_seed, device_index, k)``) and
applies ``w -= (lr / K) sum_j d_j z_j`` with the float32 ``"pairs"`` sum the aggregator replays
(:func:`~fwdfleet.device_runtime.estimator.accumulate_update`; see
:mod:`fwdfleet.aggregator.modes.trajectory`), from each ``d_j`` rounded to float32 first: the value
the wire carries, so a replay from the uploaded scalars is exact.
A probe whose loss is not finite is listed in ``skipped`` (the aggregator refuses such a
trajectory: it needs every probe).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from fwdfleet.device_runtime.estimator import accumulate_update, estimate
from fwdfleet.device_runtime.train import derive_seed
from fwdfleet.device_runtime.worker import DeviceData, DeviceWorker
from fwdfleet.errors import ConfigError
from fwdfleet.perturbation import split
from fwdfleet.task import DeviceResult, RoundTask, Upload


def step_task(task: RoundTask, step: int) -> RoundTask:
    """The task of local step ``step``: its probes ``k_start + step * K + j`` and its minibatch seed."""
    k = task.num_perturbations
    return replace(task, k_start=task.k_start + step * k, data_seed=derive_seed(task.data_seed, step),
                   candidate_ratio=1)


def run_trajectory(worker: DeviceWorker, task: RoundTask,
                   data: DeviceData) -> tuple[DeviceResult, npt.NDArray[np.float32]]:
    """The trajectory's result (every step's pairs in step order) and the weights it ends with
    (flat float32, the session's trainables in order)."""
    steps, k = task.local_steps, task.num_perturbations
    if steps < 1 or task.lr <= 0:
        raise ConfigError(f"mode 'trajectory' needs a task with local_steps >= 1 and lr > 0, got {steps} and "
                          f"{task.lr}; set [aggregator.local] steps and lr")
    if task.candidate_ratio != 1 or task.k_start + steps * k > 1 << 32:
        raise ConfigError("mode 'trajectory' evaluates every issued probe (candidate_ratio 1) and needs "
                          f"k_start + steps x K <= 2**32; got candidate_ratio {task.candidate_ratio}, "
                          f"k_start {task.k_start}, {steps} x {k}")
    ws, specs = worker.workspace, worker.session.trainable_specs
    w = np.empty(ws.n, dtype=np.float32)
    current = split(w, specs)
    for t in specs:
        np.copyto(current[t.name], worker.trainables[t.name], casting="unsafe")
    indices: list[int] = []
    derivatives: list[float] = []
    skipped: list[int] = []
    losses: list[float] = []
    for s in range(steps):
        st = step_task(task, s)
        r = estimate(worker.session, current, data.batch(st.data_seed, task.batch_size), st, workspace=ws)
        # the wire carries float32 derivatives: step with exactly the values the aggregator replays
        r = replace(r, derivatives=tuple(float(np.float32(d)) for d in r.derivatives))
        if r.indices:
            accumulate_update(r, st, ws.n, scale=-task.lr / len(r.indices), out=w, buffer=ws.z)
        indices += r.indices
        derivatives += r.derivatives
        skipped += r.skipped
        if r.indices and math.isfinite(r.loss_mean):
            losses.append(r.loss_mean)
    result = DeviceResult(round_id=task.round_id, model_version=task.model_version, indices=tuple(indices),
                          derivatives=tuple(derivatives), num_samples=min(len(data), steps * task.batch_size),
                          loss_mean=float(np.mean(losses)) if losses else math.nan, skipped=tuple(skipped))
    return result, w


class TrajectoryMode:
    name = "trajectory"
    carries = "scalars"

    def check(self, worker: DeviceWorker) -> None:
        worker.require_every_trainable(self.name)

    def compute(self, worker: DeviceWorker, task: RoundTask, data: DeviceData) -> Upload:
        return Upload(run_trajectory(worker, task, data)[0])


MODE = TrajectoryMode()
