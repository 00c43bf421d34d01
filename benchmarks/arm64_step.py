"""Time per training step and peak memory of the device runtime on an EMULATED ARM64 CPU.

    python benchmarks/arm64_step.py [--steps 5] [--k 4] [--batch-size 16] [--json]

Needs the aarch64 userland of ``android_harness/arm64/build_userland.sh`` and qemu-user-static.
For each bundle (Forward-Forward MLPs exported here with ``export.ff_mlp``, trained on their
``model`` graph by perturbed inference) it runs the same worker twice, in fresh processes:

* **emulated**: the userland's aarch64 python3 under ``qemu-aarch64-static`` (``QEMU_CPU=cortex-a76``);
* **native**: this x86_64 host's python, for scale.

A step is one :func:`device_runtime.estimator.estimate` call (K central differences: 2K
forwards) plus the SGD update regenerated from the seeds (:func:`accumulate_update`); the figure
is the median over ``--steps`` steps after one warm-up step. Peak memory is ``VmHWM`` of the
worker process. **Under qemu user mode that is the emulator's own resident memory** (guest
memory plus qemu's translated-code cache), and time is dominated by binary translation: these
figures say that the ARM64 build works and how it scales, not how fast a phone is. Measure a
real device with ``android_harness/adb_run.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "android_harness" / "arm64" / "run.sh"
# name -> FFMLPConfig.layers: a digits-sized net and the 784-500-500 MNIST net of the calibration runs
BUNDLES: dict[str, tuple[int, ...]] = {"ff-64-256-256": (64, 256, 256), "ff-784-500-500": (784, 500, 500)}
LABEL = "qemu-user emulation of a Cortex-A76 on an x86_64 host (not a phone measurement)"


def worker(bundle_path: str, steps: int, k: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Runs inside the measured process (emulated or native): numpy + onnxruntime only."""

    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.data import synthetic_batch
    from fwdfleet.device_runtime.estimator import EstimatorWorkspace, accumulate_update, estimate
    from fwdfleet.device_runtime.memory import peak_rss_kb
    from fwdfleet.device_runtime.session import BundleSession, SessionOptions
    from fwdfleet.perturbation import flatten, split
    from fwdfleet.task import RoundTask

    baseline_kb = peak_rss_kb()
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=threads, inter_op_threads=1))
    load_s = time.perf_counter() - t0
    specs = session.trainable_specs
    w = flatten(bundle.load_trainables(), specs)
    current = split(w, specs)
    batch = synthetic_batch(bundle, batch_size)
    ws = EstimatorWorkspace(specs)
    times, forwards = [], 0
    for step in range(steps + 1):
        task = RoundTask(round_id=step, model_version=step, round_seed=1000 + step, device_index=1,
                         num_perturbations=k, batch_size=batch_size)  # fmt: skip
        t = time.perf_counter()
        result = estimate(session, current, batch, task, workspace=ws)
        accumulate_update(result, task, ws.n, scale=-1e-3 / k, out=w, buffer=ws.z)
        if step:  # step 0 warms up (allocations; under qemu, first-time code translation)
            times.append(time.perf_counter() - t)
        forwards = int(result.extras.get("passes", 2 * k))
    forward_times = []
    for _ in range(3):
        t = time.perf_counter()
        session.loss(current, batch)
        forward_times.append(time.perf_counter() - t)
    forward_s = statistics.median(forward_times)  # one plain forward (session.loss), median of 3
    return {
        "machine": platform.machine(),
        "trainable": int(ws.n),
        "forwards_per_step": forwards,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "forward_s": forward_s,
        "load_s": load_s,
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_rss_kb() / 1024,
    }


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--k", type=int, default=4, help="perturbations per step (2K forwards)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (both runs)")
    p.add_argument("--bundles", nargs="*", default=list(BUNDLES), choices=list(BUNDLES))
    p.add_argument("--no-native", action="store_true", help="skip the x86_64 comparison")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--worker", metavar="BUNDLE", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.k < 1 or a.batch_size < 1:
        p.error("--steps, --k and --batch-size must be >= 1")
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.k, a.batch_size, a.threads)))
        return 0

    from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp

    args = ["--steps", str(a.steps), "--k", str(a.k), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fwdfleet-arm64-bench-") as tmp:
        for name in a.bundles:
            path = export_ff_mlp(FFMLPConfig(layers=BUNDLES[name], num_classes=10), Path(tmp) / name)
            row: dict[str, Any] = {"bundle": name}
            row["emulated_arm64"] = _run(["bash", str(RUN_SH), __file__, "--worker", str(path), *args], a.timeout)
            if not a.no_native:
                row["native_x86_64"] = _run([sys.executable, __file__, "--worker", str(path), *args], a.timeout)
            rows.append(row)
    report = {
        "label": LABEL,
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "qemu_cpu": os.environ.get("QEMU_CPU", "cortex-a76"),
        "k": a.k, "batch_size": a.batch_size, "steps": a.steps, "threads": a.threads,
        "results": rows,
    }  # fmt: skip
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"ARM64 training step -- {LABEL}")
    print(f"K={a.k} (2K forwards + update), batch {a.batch_size}, {a.threads} thread(s), median of {a.steps} steps")
    print(f"{'bundle':<16} {'run':<15} {'trainable':>10} {'step s':>8} {'forward s':>10} {'peak MB':>8}")
    for row in rows:
        for run in ("emulated_arm64", "native_x86_64"):
            r = row.get(run)
            if r is None:
                continue
            if "error" in r:
                print(f"{row['bundle']:<16} {run:<15} error: {r['error']}")
                continue
            print(f"{row['bundle']:<16} {run:<15} {r['trainable']:>10,} {r['step_s_median']:>8.3f} "
                  f"{r['forward_s']:>10.4f} {r['peak_mb']:>8.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
