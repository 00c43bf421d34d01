"""Execution-provider benchmark, in the spirit of onnxruntime's ``onnxruntime_perf_test``.

For each chosen provider and each bundle (e.g. the fp32 and the int8 export of one model) a
fresh process builds a session, warms up, then runs a count (or a duration) of inferences and
of training steps (K central-difference pairs plus the seed-regenerated update), and reports
p50/p90/p99 latency, throughput and peak RSS (VmHWM). One process per (provider, bundle) keeps
each peak-memory figure clean.

``python -m fwdfleet.device_runtime.bench BUNDLE --provider P ...`` is the worker; :func:`benchmark`
runs the workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.device_runtime.memory import RuntimeOptions, add_runtime_args, peak_rss_kb, run_worker, worker_batch
from fwdfleet.device_runtime.session import available_providers, check_providers, provider_name

# Providers listed by onnxruntime that do not run a model on this machine.
REMOTE_PROVIDERS = ("AzureExecutionProvider",)


def local_providers() -> list[str]:
    return [p for p in available_providers() if p not in REMOTE_PROVIDERS]


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    per_second: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        a = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(len(a), p50, p90, p99, 1e3 * len(a) / float(a.sum()) if a.sum() > 0 else 0.0)


@dataclass(frozen=True)
class BenchResult:
    bundle: str
    provider: str
    quantization: str
    num_trainable: int
    inference: Latency | None
    train_step: Latency | None
    peak_mb: float | None
    error: str = ""
    options: RuntimeOptions = field(default_factory=RuntimeOptions)


def benchmark(
    bundles: Sequence[str | Path],
    providers: Sequence[str] | None = None,
    *,
    warmup: int = 3,
    count: int = 20,
    train_count: int = 5,
    duration: float = 0.0,
    num_perturbations: int = 4,
    batch_size: int = 16,
    sequence_length: int = 128,
    options: RuntimeOptions | None = None,
    timeout: float = 1800.0,
) -> list[BenchResult]:
    """Benchmark every (provider, bundle) pair, each in a fresh process."""
    opts = options if options is not None else RuntimeOptions()
    chosen = [provider_name(p) for p in providers] if providers else ["CPUExecutionProvider"]
    check_providers(chosen)
    out = []
    for provider in chosen:
        for bundle in bundles:
            args = [str(bundle), "--provider", provider, "--warmup", str(warmup), "--count", str(count),
                    "--train-count", str(train_count), "--duration", str(duration), "--k", str(num_perturbations),
                    "--batch-size", str(batch_size), "--sequence-length", str(sequence_length),
                    *opts.to_args()]  # fmt: skip
            r = run_worker("fwdfleet.device_runtime.bench", args, timeout)
            if "error" in r:
                out.append(BenchResult(str(bundle), provider, "?", 0, None, None, None, r["error"], opts))
                continue
            out.append(
                BenchResult(
                    bundle=str(bundle),
                    provider=provider,
                    quantization=r["quantization"],
                    num_trainable=r["num_trainable"],
                    inference=Latency(**r["inference"]),
                    train_step=Latency(**r["train_step"]),
                    peak_mb=r["peak_kb"] / 1024.0,
                    options=opts,
                )
            )
    return out


def to_json(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def format_table(results: Sequence[BenchResult]) -> str:
    head = f"{'provider':<22} {'bundle':<28} {'quant':<5} {'infer p50/p90/p99 ms':<24} {'inf/s':>7} "
    head += f"{'step p50/p90/p99 ms':<26} {'steps/s':>7} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        name = Path(r.bundle).name[:28]
        if r.error or r.inference is None or r.train_step is None:
            lines.append(f"{r.provider:<22} {name:<28} error: {r.error}")
            continue
        i, s = r.inference, r.train_step
        lines.append(
            f"{r.provider:<22} {name:<28} {r.quantization:<5} "
            f"{f'{i.p50_ms:.3g}/{i.p90_ms:.3g}/{i.p99_ms:.3g}':<24} {i.per_second:>7.1f} "
            f"{f'{s.p50_ms:.3g}/{s.p90_ms:.3g}/{s.p99_ms:.3g}':<26} {s.per_second:>7.2f} {r.peak_mb or 0:>8.1f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ worker


def _timed(fn: Callable[[], object], warmup: int, count: int, duration: float) -> list[float]:
    """Latencies of ``fn`` after ``warmup`` calls: ``count`` calls, or as many as fit in ``duration`` s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + duration

    def more() -> bool:
        if duration > 0:
            return not times or time.perf_counter() < end
        return len(times) < max(1, count)

    while more():
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fwdfleet.device_runtime.bench", description=__doc__)
    p.add_argument("bundle")
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--train-count", type=int, default=5)
    p.add_argument("--duration", type=float, default=0.0, help="seconds per phase instead of counts (0: counts)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    add_runtime_args(p)
    a = p.parse_args(argv)
    try:
        from fwdfleet.bundle import load_bundle
        from fwdfleet.device_runtime.estimator import (
            EstimatorWorkspace,
            accumulate_update,
            estimate,
            load_flat_trainables,
        )
        from fwdfleet.device_runtime.session import BundleSession
        from fwdfleet.perturbation import split
        from fwdfleet.task import RoundTask

        opts = RuntimeOptions.from_args(a)
        bundle = load_bundle(a.bundle)
        session_options = replace(opts.session_options(), providers=(a.provider,))
        session = BundleSession(bundle, session_options)
        batch = worker_batch(bundle, a.batch_size, a.sequence_length)
        trainer = session if opts.train_graph == "model" else BundleSession(bundle, session_options, opts.train_graph)
        ws = EstimatorWorkspace(session.trainable_specs, chunk=opts.chunk)
        w = load_flat_trainables(bundle, session.trainable_specs)
        current = split(w, session.trainable_specs)
        runner = session.bind(current, batch, ("loss",))
        inference = _timed(runner.run, a.warmup, a.count, a.duration)
        step_no = [0]

        def step() -> None:
            task = RoundTask(round_id=step_no[0], model_version=0, round_seed=99, device_index=0,
                             num_perturbations=a.k, k_start=a.k * step_no[0])  # fmt: skip
            step_no[0] += 1
            result = estimate(trainer, current, batch, task, workspace=ws)
            accumulate_update(result, task, ws.n, scale=-1e-6, out=w, buffer=ws.z)

        train = _timed(step, min(a.warmup, 1), a.train_count, a.duration)
    except Exception as e:  # reported to the parent as a one-line reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0]}))
        return 0
    print(
        json.dumps(
            {
                "quantization": bundle.manifest.quantization or "fp32",
                "num_trainable": ws.n,
                "inference": asdict(Latency.of(inference)),
                "train_step": asdict(Latency.of(train)),
                "peak_kb": peak_rss_kb(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
