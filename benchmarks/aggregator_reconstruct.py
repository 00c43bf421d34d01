"""Benchmark the aggregator core: reconstruction from scalars, and the coordinator's per-device cost.

1. Reconstruct an update from D devices x K scalars for an n-parameter trainable set (default
   1,000 x 16 for 100k parameters), with per-device seeds (D * K regenerated perturbations) and
   with shared seeds (K regenerated perturbations). Wall time (best of --repeat), and memory:
   the peak of numpy allocations traced by tracemalloc (a separate run) and the process's peak
   RSS growth.
2. The in-process Coordinator's per-device overhead for a round with 100 and 1,000 devices:
   join, task_for, submit (validation, bookkeeping) and closing the round (reconstruction,
   optimizer, checkpoint-free apply).

    python benchmarks/aggregator_reconstruct.py            # a table
    python benchmarks/aggregator_reconstruct.py --json     # one JSON object

The ratio printed against a device step uses --device-step-s (default 2.2 s: the onnxruntime
perturbed step, K=4, MiniLM-L6 + LoRA, measured on this machine and quoted in DESIGN.md; a K=16
step is about four times that) and the reconstruction's CPU time (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny real bundle builder (onnx.helper, no torch)

from _tiny_bundles import make_classifier_bundle  # noqa: E402

from aggregator.config import AggregatorConfig, PerturbationConfig, RoundsConfig  # noqa: E402
from aggregator.coordinator import Coordinator, DeviceProfile  # noqa: E402
from aggregator.reconstruct import Contribution, reconstruct  # noqa: E402
from device_runtime.task import DeviceResult  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _contribs(devices: int, k: int) -> list[Contribution]:
    rng = np.random.default_rng(0)
    return [Contribution(i + 1, tuple(range(k)), tuple(float(x) for x in rng.standard_normal(k)))
            for i in range(devices)]


def bench_reconstruct(devices: int, k: int, n: int, shared: bool, repeat: int) -> dict[str, float]:
    contribs = _contribs(devices, k)
    rss0 = _rss_mb()
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        reconstruct(contribs, n=n, round_seed=12345, shared_seeds=shared)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rss_growth = _rss_mb() - rss0
    tracemalloc.start()
    reconstruct(contribs, n=n, round_seed=12345, shared_seeds=shared)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"devices": devices, "k": k, "n": n, "shared_seeds": shared, "seconds": min(times),
            "cpu_seconds": min(cpu),
            "perturbations_regenerated": k if shared else devices * k,
            "traced_peak_mb": peak / 2**20, "peak_rss_growth_mb": rss_growth,
            "dense_buffer_mb": n * 4 / 2**20}


def bench_coordinator(devices: int, k: int, bundle_dir: Path, shared: bool) -> dict[str, float]:
    from fwdfleet.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    cfg = AggregatorConfig(rounds=RoundsConfig(min_devices=devices, deadline_s=1e9),
                           perturbation=PerturbationConfig(k=k, shared_seeds=shared))
    coord = Coordinator(cfg, bundle)
    ids = [f"device-{i:05d}" for i in range(devices)]
    rng = np.random.default_rng(1)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in ids:
        coord.join(i, DeviceProfile(platform="bench", ram_mb=2048))
    t1 = time.perf_counter()
    tasks = [coord.task_for(i) for i in ids]
    t2 = time.perf_counter()
    results = [DeviceResult(t.round_id, t.model_version, tuple(range(t.k_start, t.k_start + t.num_perturbations)),
                            tuple(float(x) for x in rng.standard_normal(t.num_perturbations)), 16, 1.0)
               for t in tasks if t is not None]
    t3 = time.perf_counter()
    for i, r in zip(ids[:-1], results[:-1], strict=True):
        coord.submit(i, r)
    t4 = time.perf_counter()
    coord.submit(ids[-1], results[-1])  # the last result closes the round: reconstruct + apply
    t5 = time.perf_counter()
    cpu = time.process_time() - c0
    assert coord.status().model_version == 1
    return {"devices": devices, "k": k, "shared_seeds": shared,
            "join_us_per_device": (t1 - t0) / devices * 1e6,
            "task_for_us_per_device": (t2 - t1) / devices * 1e6,
            "submit_us_per_device": (t4 - t3) / (devices - 1) * 1e6,
            "close_round_s": t5 - t4,
            "total_round_s": (t2 - t0) + (t5 - t3), "process_cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--params", type=int, default=100_000, help="approximate trainable size (a 1000 x C head)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fleet", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--device-step-s", type=float, default=2.2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    classes = max(1, round(args.params / 1001))
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = Path(tmp) / "bundle"
        bundle = make_classifier_bundle(bundle_dir, 1000, classes)
        n = bundle.manifest.num_trainable
        recon = [bench_reconstruct(args.devices, args.k, n, shared, args.repeat) for shared in (False, True)]
        for r in recon:
            r["ratio_to_device_step"] = r["cpu_seconds"] / args.device_step_s
        fleet = [bench_coordinator(d, args.k, bundle_dir, shared) for d in args.fleet for shared in (False, True)]
    out = {"n": n, "device_step_s": args.device_step_s, "reconstruct": recon, "coordinator": fleet,
           "python": sys.version.split()[0], "numpy": np.__version__}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"reconstruction, {args.devices} devices x K={args.k}, n={n} trainable parameters")
    for r in recon:
        seeds = "shared" if r["shared_seeds"] else "per-device"
        print(f"  {seeds:10s} seeds: {r['seconds']:.3f} s wall, {r['cpu_seconds']:.3f} s CPU "
              f"({r['perturbations_regenerated']} perturbations), "
              f"{r['ratio_to_device_step']:.3f} x a {args.device_step_s} s device step; traced peak "
              f"{r['traced_peak_mb']:.1f} MB (one dense vector: {r['dense_buffer_mb']:.2f} MB), "
              f"RSS growth {r['peak_rss_growth_mb']:.1f} MB")
    print("coordinator round overhead, in-process")
    for f in fleet:
        seeds = "shared" if f["shared_seeds"] else "per-device"
        print(f"  {f['devices']:5d} devices, {seeds:10s}: join {f['join_us_per_device']:.0f} us, task_for "
              f"{f['task_for_us_per_device']:.0f} us, submit {f['submit_us_per_device']:.0f} us per device; "
              f"close {f['close_round_s']:.3f} s; round total {f['total_round_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
