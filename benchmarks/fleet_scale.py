"""How in-process fleet emulation scales: one emulated round with 100, 1,000 and 10,000 devices.

For each fleet size, in a fresh subprocess (so peak memory is that size's alone):

1. **emulation**: every device joins the real Coordinator, is selected, computes its result with
   the real device runtime (onnxruntime, K perturbed forward-pass pairs on a batch of its own
   shard) in the compute pool, uploads its scalars through the simulated clock; the round is
   applied. Reported: wall time of the round (``round_s``; the joins and the pool start-up are
   ``setup_s``), device compute per device, and the peak RSS (VmHWM) of the whole emulation
   (this process plus its worker processes, each read from /proc before the pool closes).
2. **aggregator**: the same Coordinator alone (no device compute), N devices with valid results:
   wall time per device of join + task_for + submit, the time to close the round (reconstruction
   from N x K scalars + optimizer), and the memory the Coordinator keeps per device (tracemalloc,
   after the round) as well as the RSS growth.

The model is the demo's shape (a 64-32-10 MLP on 8x8 digits, 2,410 trainable values, built with
onnx.helper, no torch); scikit-learn's digits are tiled so that every device holds
``--per-device`` examples (IID). K=8, batch 32, central differences, as in ``fwdfleet demo``.

    python benchmarks/fleet_scale.py                          # 100, 1,000, 10,000; a table
    python benchmarks/fleet_scale.py --sizes 100 1000 --json  # JSON
    python benchmarks/fleet_scale.py --workers 2              # two device-compute processes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny real bundle builder (onnx.helper, no torch)


def _proc_kb(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _children() -> list[int]:
    try:
        import psutil
    except ImportError:
        return []
    return [c.pid for c in psutil.Process().children(recursive=True)]


def _setup(devices: int, per_device: int, k: int, batch: int, tmp: Path) -> tuple[Any, ...]:
    from _tiny_bundles import make_classifier_bundle
    from sklearn.datasets import load_digits

    from fwdfleet.aggregator.config import config_from_dict
    from fwdfleet.device_runtime.data import RawData
    from fwdfleet.fleet.partition import PartitionConfig, partition

    x, y = load_digits(return_X_y=True)
    reps = math.ceil(devices * per_device / len(y))
    train = RawData(labels=np.tile(y.astype(np.int64), reps)[: devices * per_device],
                    features=np.tile((x / 16.0).astype(np.float32), (reps, 1))[: devices * per_device])
    assert train.labels is not None
    shards = partition(train.labels, PartitionConfig("iid", devices, seed=0))
    bundle = make_classifier_bundle(tmp / "bundle", in_dim=64, num_classes=10, hidden=32)
    config = config_from_dict({
        "rounds": {"min_devices": devices, "fraction": 1.0, "over_selection": 1.0, "min_results": 1,
                   "deadline_s": 1e9, "batch_size": batch},
        "perturbation": {"k": k, "eps": 0.01}, "optimizer": {"name": "sgd", "lr": 0.5}})
    return bundle, config, train, shards


def child_emulation(devices: int, workers: int, per_device: int, k: int, batch: int) -> dict[str, Any]:
    from fwdfleet.fleet.emulate import EmulationSettings, emulate
    from fwdfleet.fleet.profiles import EmulatedProfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, config, train, shards = _setup(devices, per_device, k, batch, Path(tmp))
        settings = EmulationSettings(rounds=1, workers=workers, eval_every=0, seed=0)
        worker_hwm: dict[int, int] = {}

        def on_round(_rec: Any) -> None:  # the pool is still alive here: read its workers' peaks
            for pid in _children():
                with contextlib.suppress(OSError):  # a worker that already exited
                    worker_hwm[pid] = _proc_kb(pid, "VmHWM")

        t1, c1 = time.perf_counter(), time.process_time()
        records = list(emulate(bundle, config, train, shards, [EmulatedProfile()] * devices, settings,
                               on_round=on_round))
        t2, c2 = time.perf_counter(), time.process_time()
    rec = records[0]
    own = _proc_kb("self", "VmHWM")
    return {
        "devices": devices, "workers": workers, "participants": rec.participants,
        "round_s": rec.wall_time_s, "setup_s": (t2 - t1) - rec.wall_time_s, "data_s": t1 - t0,
        "main_cpu_s": c2 - c1,  # this process's CPU for joins + round (all of it when workers == 1)
        "compute_ms_per_device": 1e3 * rec.wall_time_s * workers / devices,
        "bytes_up_per_device": rec.bytes_up_per_device,
        "peak_rss_mb": (own + sum(worker_hwm.values())) / 1024, "peak_rss_main_mb": own / 1024,
        "worker_peaks_mb": [v / 1024 for v in worker_hwm.values()],
    }


def child_aggregator(devices: int, k: int) -> dict[str, Any]:
    from fwdfleet.aggregator.coordinator import Coordinator
    from fwdfleet.aggregator.records import DeviceProfile
    from fwdfleet.task import DeviceResult

    with tempfile.TemporaryDirectory() as tmp:
        bundle, config, _train, _shards = _setup(devices, 1, k, 32, Path(tmp))
        ids = [f"device-{i:05d}" for i in range(devices)]
        rng = np.random.default_rng(0)
        derivs = [tuple(float(v) for v in rng.standard_normal(k)) for _ in ids]

        def one_round() -> tuple[dict[str, float], Coordinator]:
            coord = Coordinator(config, bundle, clock=lambda: 0.0)
            t0 = time.perf_counter()
            for i in ids:
                coord.join(i, DeviceProfile(platform="bench", ram_mb=2048))
            tj = time.perf_counter()
            tasks = [coord.task_for(i) for i in ids]
            t1 = time.perf_counter()
            results = [DeviceResult(t.round_id, t.model_version, tuple(t.candidate_indices), d, 32, 2.3)
                       for t, d in zip(tasks, derivs) if t is not None]
            t2 = time.perf_counter()
            for i, r in zip(ids[:-1], results[:-1]):
                coord.submit(i, r)
            t3 = time.perf_counter()
            coord.submit(ids[-1], results[-1])  # the last result closes the round: reconstruct + apply
            t4 = time.perf_counter()
            assert coord.status().model_version == 1, "the round was not applied"
            us = 1e6 / devices
            return {"per_device_us": us * ((t1 - t0) + (t3 - t2)), "join_us": us * (tj - t0),
                    "task_for_us": us * (t1 - tj), "submit_us": us * (t3 - t2), "close_round_s": t4 - t3}, coord

        rss0 = _proc_kb("self", "VmRSS")
        timed, coord = one_round()
        rss_growth = _proc_kb("self", "VmRSS") - rss0
        del coord
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        _, _kept = one_round()  # kept alive while measuring: what the Coordinator holds after a round
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    return {"devices": devices, **timed, "bytes_per_device": held / devices,
            "rss_growth_kb_per_device": rss_growth / devices}


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--workers", type=int, default=1, help="device-compute processes (1: all in one process)")
    ap.add_argument("--per-device", type=int, default=8, help="examples each device holds")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=("emulation", "aggregator"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "emulation":
        print(json.dumps(child_emulation(args.sizes[0], args.workers, args.per_device, args.k, args.batch)))
        return 0
    if args.child == "aggregator":
        print(json.dumps(child_aggregator(args.sizes[0], args.k)))
        return 0

    common = ["--workers", str(args.workers), "--per-device", str(args.per_device), "--k", str(args.k),
              "--batch", str(args.batch)]
    emulation, aggregator = [], []
    for n in args.sizes:
        emulation.append(run_child(["--child", "emulation", "--sizes", str(n), *common], args.timeout))
        aggregator.append(run_child(["--child", "aggregator", "--sizes", str(n), *common], args.timeout))
        if not args.json:
            print(f"... {n} devices done", file=sys.stderr)
    out = {"k": args.k, "batch": args.batch, "workers": args.workers, "per_device_examples": args.per_device,
           "cpus": os.cpu_count(), "emulation": emulation, "aggregator": aggregator}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"one emulated round, K={args.k}, batch {args.batch}, {args.workers} compute process(es), "
          f"{os.cpu_count()} CPUs")
    print(f"{'devices':>8} {'round s':>8} {'setup s':>8} {'CPU s':>6} {'ms/device':>9} {'B up/dev':>8} "
          f"{'peak RSS MB':>11} | {'agg us/dev':>10} {'join':>6} {'task':>6} {'submit':>6} {'close s':>8} "
          f"{'agg B/dev':>9}")
    for e, a in zip(emulation, aggregator):
        print(f"{e['devices']:>8,} {e['round_s']:>8.2f} {e['setup_s']:>8.2f} {e['main_cpu_s']:>6.1f} "
              f"{e['compute_ms_per_device']:>9.2f} "
              f"{e['bytes_up_per_device']:>8.0f} {e['peak_rss_mb']:>11.0f} | {a['per_device_us']:>10.0f} "
              f"{a['join_us']:>6.0f} {a['task_for_us']:>6.0f} {a['submit_us']:>6.0f} {a['close_round_s']:>8.3f} "
              f"{a['bytes_per_device']:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
