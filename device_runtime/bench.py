"""Execution-provider benchmark, in the spirit of onnxruntime's ``onnxruntime_perf_test``.

For each chosen provider and each bundle (e.g. the fp32 and the int8 export of one model) a
fresh process builds a session, warms up, then runs a count (or a duration) of inferences and
of training steps (K central-difference pairs plus the seed-regenerated update), and reports
p50/p90/p99 latency, throughput and peak RSS (VmHWM). One process per (provider, bundle) keeps
each peak-memory figure clean.

For NPUs (plugin providers such as ``qnn-htp`` or ``openvino``, see ``device_runtime.session``)
each result also says where the nodes ran (how many on the provider, which operators fell back to
the CPU), whether the backend is a simulator on this machine, and the **fidelity of training**:
the central-difference derivatives d_k of a training step computed through the provider against
the fp32 CPU ones (the static bundle's fp32 source, else the same bundle on the CPU) on the same
batch and perturbations, for each eps of a sweep: Pearson correlation, relative error
||d - d_ref|| / ||d_ref|| and sign agreement, and the eps that keeps them best. The JSON has the
same shape for every provider.

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
from fwdfleet.device_runtime.session import PLUGIN_PROVIDERS, available_providers, check_providers, provider_name

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
class Placement:
    """Where onnxruntime put the nodes of the session's (optimized) graph."""

    nodes: int
    by_provider: dict[str, int]
    cpu_fallback: dict[str, int]  # op_type -> count of nodes left on the CPU (empty for the CPU provider)
    on_provider: float  # share of the nodes on the provider asked for

    @classmethod
    def of(cls, provider: str, assignment: Sequence[tuple[str, str, str]]) -> Placement:
        by: dict[str, int] = {}
        fallback: dict[str, int] = {}
        for ep, op, _ in assignment:
            by[ep] = by.get(ep, 0) + 1
            if ep == "CPUExecutionProvider" and provider != "CPUExecutionProvider":
                fallback[op] = fallback.get(op, 0) + 1
        n = len(assignment)
        return cls(n, by, fallback, by.get(provider, 0) / n if n else 0.0)


@dataclass(frozen=True)
class Fidelity:
    """d_k through the provider against the fp32 CPU reference at one eps (same batch, same z_k)."""

    eps: float
    correlation: float
    relative_error: float
    sign_agreement: float
    zero_fraction: float  # share of d_k that are exactly 0 through the provider (eps z lost in rounding)


def fidelity(derivatives: Sequence[float], reference: Sequence[float], eps: float) -> Fidelity:
    d = np.asarray(derivatives, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    corr = float(np.corrcoef(d, r)[0, 1]) if d.std() > 0 and r.std() > 0 else 0.0
    rel = float(np.linalg.norm(d - r) / np.linalg.norm(r)) if np.linalg.norm(r) > 0 else float("inf")
    return Fidelity(eps, corr, rel, float(np.mean(np.sign(d) == np.sign(r))), float(np.mean(d == 0)))


def recommend_eps(points: Sequence[Fidelity], min_correlation: float = 0.9) -> float | None:
    """The smallest eps whose correlation with the fp32 d_k reaches ``min_correlation`` (a small eps
    keeps the finite-difference bias small); None when no eps of the sweep does."""
    good = [p.eps for p in points if p.correlation >= min_correlation]
    return min(good) if good else None


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
    simulated: bool = False  # the backend is a simulator on this machine: latencies are not the device's
    placement: Placement | None = None
    reference: str = ""  # the bundle and provider of the fidelity reference
    fidelity: tuple[Fidelity, ...] = ()
    recommended_eps: float | None = None


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
    fidelity_eps: Sequence[float] = (),
    fidelity_k: int = 32,
    data: str | Path | None = None,
) -> list[BenchResult]:
    """Benchmark every (provider, bundle) pair, each in a fresh process.

    ``fidelity_eps``: the eps sweep of the training-fidelity check (none: no check); ``fidelity_k``
    perturbations each; ``data``: a file of the device's data for the batch (default: synthetic).
    """
    opts = options if options is not None else RuntimeOptions()
    chosen = [provider_name(p) for p in providers] if providers else ["CPUExecutionProvider"]
    check_providers(chosen)
    out = []
    for provider in chosen:
        for bundle in bundles:
            args = [str(bundle), "--provider", provider, "--warmup", str(warmup), "--count", str(count),
                    "--train-count", str(train_count), "--duration", str(duration), "--k", str(num_perturbations),
                    "--batch-size", str(batch_size), "--sequence-length", str(sequence_length),
                    "--fidelity-eps", ",".join(repr(float(e)) for e in fidelity_eps), "--fidelity-k", str(fidelity_k),
                    *(["--data", str(data)] if data else []), *opts.to_args()]  # fmt: skip
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
                    simulated=r["simulated"],
                    placement=Placement(**r["placement"]),
                    reference=r["reference"],
                    fidelity=tuple(Fidelity(**f) for f in r["fidelity"]),
                    recommended_eps=r["recommended_eps"],
                )
            )
    return out


def to_json(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def format_table(results: Sequence[BenchResult]) -> str:
    head = f"{'provider':<22} {'bundle':<28} {'quant':<9} {'infer p50/p90/p99 ms':<24} {'inf/s':>7} "
    head += f"{'step p50/p90/p99 ms':<26} {'steps/s':>7} {'peak MB':>8} {'on EP':>6}"
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for r in results:
        name = Path(r.bundle).name[:28]
        if r.error or r.inference is None or r.train_step is None:
            lines.append(f"{r.provider:<22} {name:<28} error: {r.error}")
            continue
        i, s = r.inference, r.train_step
        placed = r.placement
        share = f"{100 * placed.on_provider:.0f}%" if placed and placed.nodes else "n/a"
        label = r.provider + (" (sim)" if r.simulated else "")
        lines.append(
            f"{label:<22} {name:<28} {r.quantization:<9} "
            f"{f'{i.p50_ms:.3g}/{i.p90_ms:.3g}/{i.p99_ms:.3g}':<24} {i.per_second:>7.1f} "
            f"{f'{s.p50_ms:.3g}/{s.p90_ms:.3g}/{s.p99_ms:.3g}':<26} {s.per_second:>7.2f} {r.peak_mb or 0:>8.1f} "
            f"{share:>6}"
        )
        if placed and placed.cpu_fallback:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(placed.cpu_fallback.items()))
            notes.append(f"{r.provider} / {name}: {placed.nodes - sum(placed.cpu_fallback.values())} of "
                         f"{placed.nodes} nodes on the provider; on the CPU: {ops}")
        if r.fidelity:
            sweep = "; ".join(f"eps {f.eps:g}: corr {f.correlation:.3f}, rel err {f.relative_error:.3f}, "
                              f"sign {100 * f.sign_agreement:.0f}%" for f in r.fidelity)
            pick = f"{r.recommended_eps:g}" if r.recommended_eps is not None else "none (no eps reaches corr 0.9)"
            notes.append(f"{r.provider} / {name}: d_k vs {r.reference}: {sweep}; recommended eps {pick}")
    if any(r.simulated for r in results):
        notes.append("(sim): the backend is a simulator on this machine; its latencies are not the device's")
    return "\n".join([*lines, "", *notes] if notes else lines)


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
    p.add_argument("--fidelity-eps", default="", help="comma-separated eps sweep of the fidelity check")
    p.add_argument("--fidelity-k", type=int, default=32)
    p.add_argument("--data", help="the device's data for the batch (default: synthetic)")
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
        session_options = replace(opts.session_options(), providers=(a.provider,), record_assignment=True)
        session = BundleSession(bundle, session_options)
        batch = _batch(bundle, a)
        placement = Placement.of(session.providers[0], session.node_assignment())
        eps_sweep = [float(e) for e in a.fidelity_eps.split(",") if e.strip()]
        reference, points = _fidelity(bundle, session, batch, eps_sweep, a.fidelity_k, opts)
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
    plugin = PLUGIN_PROVIDERS.get(a.provider)
    print(
        json.dumps(
            {
                "quantization": bundle.manifest.quantization or "fp32",
                "num_trainable": ws.n,
                "inference": asdict(Latency.of(inference)),
                "train_step": asdict(Latency.of(train)),
                "peak_kb": peak_rss_kb(),
                "simulated": bool(plugin is not None and plugin.simulated),
                "placement": asdict(placement),
                "reference": reference,
                "fidelity": [asdict(f) for f in points],
                "recommended_eps": recommend_eps(points),
            }
        )
    )
    return 0


def _batch(bundle: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The bench's batch: ``--batch-size`` examples of ``--data`` (the device's), else synthetic.
    A static bundle's fixed batch size wins over ``--batch-size``."""
    spec = bundle.manifest.graph("model").data_inputs
    fixed = spec[0].shape[0] if spec and spec[0].shape and isinstance(spec[0].shape[0], int) else None
    size = fixed or a.batch_size
    if a.data:
        from fwdfleet.device_runtime.data import load_dataset

        return dict(load_dataset(a.data, bundle).batch(0, size))
    return worker_batch(bundle, size, a.sequence_length)


def _fidelity(bundle: Any, session: Any, batch: dict[str, Any], eps_sweep: Sequence[float], k: int,
              opts: RuntimeOptions) -> tuple[str, list[Fidelity]]:
    """d_k through ``session`` against the fp32 CPU reference, for each eps (see the module doc)."""
    if not eps_sweep:
        return "", []
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.estimator import estimate
    from fwdfleet.device_runtime.session import BundleSession
    from fwdfleet.task import RoundTask

    source = bundle.manifest.settings.get("static_quantization", {}).get("source")
    ref_bundle = load_bundle(source) if source and Path(source).is_dir() else bundle
    if ref_bundle is bundle and bundle.manifest.quantization is not None:
        raise ValueError(f"{bundle.path} is quantized and its fp32 source is not at hand; fidelity needs the fp32 "
                         "bundle beside it")
    ref = BundleSession(ref_bundle, replace(opts.session_options(), providers=("cpu",)))
    w = ref_bundle.load_trainables()
    trainables = {t.name: np.ascontiguousarray(w[t.name]) for t in session.trainable_specs}
    points = []
    for eps in eps_sweep:
        task = RoundTask(round_id=0, model_version=0, round_seed=1234, device_index=0, num_perturbations=k,
                         eps=eps)
        got = estimate(session, trainables, batch, task)
        want = estimate(ref, trainables, batch, task)
        if got.indices != want.indices:
            raise ValueError("the provider and the reference skipped different perturbations (non-finite losses)")
        points.append(fidelity(got.derivatives, want.derivatives, eps))
    return f"{ref_bundle.path.name} on CPUExecutionProvider (fp32)", points


if __name__ == "__main__":
    sys.exit(_main())
