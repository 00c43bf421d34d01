"""What the ``trajectory`` upload mode costs the aggregator: replaying devices' trajectories against
one device's round.

The model and data of ``docs/results/baffle.md`` (Fashion-MNIST 784-32-10, 25,450 trainables,
minibatch 64, eps 1e-3, Rademacher probes). One device's round is
:func:`fwdfleet.device_runtime.modes.trajectory.run_trajectory`: S steps of K central differences
(2 S K forwards) and S local updates. The aggregator's work per device is
:func:`fwdfleet.aggregator.modes.trajectory.replay` (S K float32 multiply-adds of a Rademacher
vector, the ``"pairs"`` sum: bit-exact with the device); measured for ``--devices`` devices, each
with its own device index and the scalars of a real device's trajectory.

For comparison, the round's mean update of the same trajectories as ONE sum over every device's
``S x K`` pairs with the aggregator's bit-domain ``"lanes"`` sum (the linear form of a trajectory:
``w_final = w_0 - lr/K sum_s sum_j d_sj z_sj``, the scalars being given): what a server could use
when it does not need each device's exact weights. It differs from the mean of the exact replays
by float rounding only (reported). Everything runs on one thread::

    nice python benchmarks/trajectory_replay.py --devices 1000 --json docs/results/trajectory_replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwdfleet.aggregator.modes.trajectory import replay
from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.data import dataset_for_bundle
from fwdfleet.device_runtime.modes.trajectory import run_trajectory
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.worker import DeviceWorker
from fwdfleet.export.mlp import MLPConfig, export_mlp
from fwdfleet.fleet.datasets import DatasetConfig, load_split, subset
from fwdfleet.perturbation import flatten
from fwdfleet.perturbation.sums import WeightedSeeds, add_weighted_perturbations
from fwdfleet.protocol import serde
from fwdfleet.task import RoundTask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5, help="device rounds timed (the median is reported)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    data = load_split(DatasetConfig(name="fashion-mnist", max_train=2000, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(export_mlp(MLPConfig(layer_sizes=(784, 32, 10), seed=0), Path(tmp) / "mlp"))
        local = dataset_for_bundle(subset(data.train, np.arange(2000)), bundle)
        worker = DeviceWorker(bundle, BundleSession(bundle, SessionOptions(intra_op_threads=1, inter_op_threads=1)))
        worker.set_model(0, bundle.load_trainables())
        start = flatten(bundle.load_trainables(), bundle.manifest.trainables)
        n = start.size
        task = RoundTask(round_id=0, model_version=0, round_seed=0x5EED, device_index=0, num_perturbations=args.k,
                         eps=args.eps, batch_size=args.batch_size, data_seed=1, upload_mode="trajectory",
                         lr=args.lr, local_steps=args.steps)
        run_trajectory(worker, task, local)  # warm-up (session, workspace)
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            result, final = run_trajectory(worker, RoundTask(**{**task.__dict__, "data_seed": 2 + r}), local)
            times.append(time.perf_counter() - t)
        device_s = float(np.median(times))
        sent = serde.result_from_proto(serde.result_to_proto(result.for_upload()))
        exact = np.array_equal(replay(start, sent.indices, sent.derivatives, round_seed=task.round_seed, device=0,
                                      num_perturbations=args.k, lr=args.lr, distribution="rademacher"), final)

        out = np.empty(n, dtype=np.float32)
        mean_exact = np.zeros(n, dtype=np.float64)
        t = time.perf_counter()
        for d in range(args.devices):
            replay(start, sent.indices, sent.derivatives, round_seed=task.round_seed, device=d,
                   num_perturbations=args.k, lr=args.lr, distribution="rademacher", out=out)
            mean_exact += out
        replay_s = time.perf_counter() - t
        mean_exact /= args.devices

        scale = -args.lr / args.k
        weights = np.array([scale * x for x in sent.derivatives], dtype=np.float64)
        terms = [WeightedSeeds(d, sent.indices, weights) for d in range(args.devices)]
        total = np.zeros(n, dtype=np.float32)
        t = time.perf_counter()
        add_weighted_perturbations(total, terms, round_seed=task.round_seed, method="lanes", threads=1)
        lanes_s = time.perf_counter() - t
        lanes_mean = start.astype(np.float64) + total.astype(np.float64) / args.devices
        diff = float(np.abs(lanes_mean - mean_exact).max())

    doc: dict[str, Any] = {
        "model": "784-32-10", "trainables": n, "steps": args.steps, "k": args.k, "batch_size": args.batch_size,
        "devices": args.devices, "uplink_bytes": serde.result_to_proto(result.for_upload()).ByteSize(),
        "device_round_s": device_s, "device_round_times_s": times, "replay_matches_device": exact,
        "replay_exact_total_s": replay_s, "replay_exact_per_device_s": replay_s / args.devices,
        "replay_exact_over_device_round": replay_s / device_s,
        "lanes_mean_update_total_s": lanes_s, "lanes_over_device_round": lanes_s / device_s,
        "lanes_vs_exact_max_abs_diff": diff, "threads": 1,
    }
    print(json.dumps(doc, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
