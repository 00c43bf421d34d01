"""``fedavg``: train locally from the current weights, upload the trained weights (FedFwd, FedAvg).

Forward-Forward bundles (kind ``ff_mlp``) train every layer on its own objective
(:func:`~fwdfleet.device_runtime.ff_train.train_ff`: closed-form layer gradients or perturbed
inference of the layer graphs); any other bundle takes perturbed-inference SGD steps
(:func:`~fwdfleet.device_runtime.train.sgd_step`). The task sets the round: learning rate,
local steps (or epochs over the local data), batch size, K, eps, objective, local mode and the
seed; the worker's defaults fill what it leaves open. The upload's ``num_samples`` is the number
of distinct local examples used, ``min(len(data), steps x batch size)``: what the aggregator
weighs the weights by, and bounds by the task and the shard the device declared at join.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from fwdfleet.device_runtime.ff import FFLayout, LayerRunner, NumpyLayers, OnnxLayers
from fwdfleet.device_runtime.ff_train import train_ff
from fwdfleet.device_runtime.train import local_step_task, sgd_step
from fwdfleet.device_runtime.worker import DeviceData, DeviceWorker, flat_trainables
from fwdfleet.errors import DataError
from fwdfleet.perturbation import split
from fwdfleet.task import DeviceResult, RoundTask, Upload


class FedAvgMode:
    name = "fedavg"
    carries = "vector"

    def check(self, worker: DeviceWorker) -> None:
        pass  # FF bundles train layer by layer, any other bundle by perturbed SGD

    def compute(self, worker: DeviceWorker, task: RoundTask, data: DeviceData) -> Upload:
        if worker.bundle.manifest.kind == "ff_mlp":
            trained, steps, loss = _train_ff(worker, task, data)
        else:
            trained, steps, loss = _train_perturbed(worker, task, data)
        samples = min(len(data), steps * task.batch_size)
        result = DeviceResult(round_id=task.round_id, model_version=task.model_version, indices=(), derivatives=(),
                              num_samples=samples, loss_mean=loss)
        return Upload(result, flat_trainables(trained, worker.bundle))


def _steps(task: RoundTask, n: int) -> int:
    return task.local_steps or task.local_epochs * max(1, math.ceil(n / task.batch_size))


def _train_ff(worker: DeviceWorker, task: RoundTask, data: DeviceData) -> tuple[dict[str, np.ndarray], int, float]:
    base = worker.defaults.ff_train
    config = replace(base, seed=task.data_seed & 0xFFFFFFFF, lr=task.lr or base.lr, epochs=task.local_epochs,
                     max_steps=task.local_steps or None, batch_size=task.batch_size,
                     objective=task.objective or base.objective,  # type: ignore[arg-type]
                     mode=task.local_mode or base.mode,  # type: ignore[arg-type]
                     num_perturbations=task.num_perturbations, eps=task.eps, distribution=task.distribution)
    examples = data.batch(task.data_seed, len(data))  # every local example, in order
    if "x" not in examples or "labels" not in examples:
        raise DataError(f"an ff_mlp bundle trains on inputs 'x' and 'labels'; the local data has {sorted(examples)}")
    key = f"ff-runner-{config.mode}"
    runner: LayerRunner | None = worker.cache.get(key)
    if runner is None:
        runner = OnnxLayers(worker.bundle) if config.mode == "perturbed" else \
            NumpyLayers(FFLayout.from_manifest(worker.bundle.manifest))
        worker.cache[key] = runner
    ff = train_ff(worker.bundle, examples["x"], examples["labels"], config, trainables=worker.trainables,
                  runner=runner)
    losses = [v for k, v in ff.metrics.items() if k.startswith("loss_layer_")]
    return dict(ff.trainables), int(ff.metrics["steps"]), float(np.mean(losses)) if losses else 0.0


def _train_perturbed(worker: DeviceWorker, task: RoundTask,
                     data: DeviceData) -> tuple[dict[str, np.ndarray], int, float]:
    base = worker.defaults.local_train
    steps = _steps(task, len(data))
    config = replace(base, steps=steps, lr=task.lr or base.lr, num_perturbations=task.num_perturbations,
                     eps=task.eps, batch_size=task.batch_size, seed=task.data_seed, distribution=task.distribution,
                     difference=task.difference, candidate_ratio=1)
    ws, specs = worker.workspace, worker.session.trainable_specs
    w = np.empty(ws.n, dtype=np.float32)
    current = split(w, specs)
    for t in specs:
        np.copyto(current[t.name], worker.trainables[t.name], casting="unsafe")
    losses = []
    for step in range(steps):
        step_task = local_step_task(config, step)
        batch = data.batch(step_task.data_seed, config.batch_size)
        losses.append(sgd_step(worker.session, current, w, batch, step_task, config.lr_at(step), ws).loss_mean)
    trained = dict(worker.trainables)
    trained.update({t.name: current[t.name].astype(t.dtype) for t in specs})
    finite = [v for v in losses if math.isfinite(v)]
    return trained, steps, float(np.mean(finite)) if finite else math.nan


MODE = FedAvgMode()
