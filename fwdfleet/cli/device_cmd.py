"""``fwdfleet device``: train a bundle locally, measure its memory, benchmark execution providers.

``device run`` (joining an aggregator) is registered by :mod:`fwdfleet.cli.device_run_cmd`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fwdfleet.errors import ConfigError


def register(sub: Any) -> None:
    from fwdfleet.device_runtime.memory import add_runtime_args  # standard library only: cheap at start-up

    p = sub.add_parser("device", help="train, measure and benchmark on this device", description=__doc__)
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", required=True)

    t = dsub.add_parser(
        "train",
        help="train a bundle on local data by perturbed inference (no server)",
        description="Train a bundle on one device's data (IDX folder/file, CSV or .npz) by perturbed "
        "inference: K seed-regenerated perturbations per step, SGD on the trainable tensors, "
        "periodic evaluation (loss, accuracy, macro-F1, per-class precision/recall, confusion matrix); "
        "saves the trained tensors as a new bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("bundle", help="bundle folder or .zip")
    t.add_argument("--data", required=True, help="training data: IDX folder or images file, .csv, .npz")
    t.add_argument("--eval-data", help="evaluation data (default: --eval-fraction of --data held out)")
    t.add_argument("--eval-fraction", type=float, default=0.2, help="share of --data held out")
    t.add_argument("--split", default="train", help="IDX split prefix inside a folder (train, t10k)")
    t.add_argument("--label-column", default="label", help="CSV label column")
    t.add_argument("--steps", type=int, default=200, help="training steps")
    t.add_argument("--k", type=int, default=4, help="perturbations per step")
    t.add_argument("--eps", type=float, default=1e-2, help="perturbation scale")
    t.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    t.add_argument("--difference", choices=("central", "forward"), default="central", help="finite difference")
    t.add_argument("--batch-size", type=int, default=16, help="examples per step")
    t.add_argument("--seed", type=int, default=0, help="seed of the perturbations, batches and split")
    t.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (0: start and end)")
    t.add_argument("--eval-examples", type=int, default=0, help="at most this many evaluation examples (0: all)")
    t.add_argument("--out", default=None, help="folder for the trained bundle (default: do not save)")
    t.add_argument("--train-graph", default="model", help="graph of the training steps: 'model_stack' evaluates "
                   "several perturbed points per call (`fwdfleet export stack`; its fixed batch = --batch-size)")
    _session_args(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    t.add_argument("--json", action="store_true", help="print the evaluations as JSON at the end")
    t.set_defaults(func=_train)

    m = dsub.add_parser(
        "memory",
        help="peak RSS of inference, a training step and torch backprop, each in a fresh process",
        description="Measure peak resident memory (VmHWM) of an inference, of a perturbed-inference "
        "training step and, where torch and the export extra are installed, of a torch backprop step, "
        "each in a fresh process, on a synthetic batch of the bundle's inputs. The defaults are the "
        "memory-friendly session options (memory pattern off); the flags change them.",
    )
    m.add_argument("bundle")
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--sequence-length", type=int, default=128)
    m.add_argument("--k", type=int, default=4, help="perturbations in the training step (default 4)")
    add_runtime_args(m)
    m.add_argument("--modes", default="inference,train,torch",
                   help="comma-separated subset of inference, train, torch, torch-ckpt (torch backprop with "
                   "gradient checkpointing) (default: %(default)s)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_memory)

    b = dsub.add_parser(
        "bench",
        help="latency, throughput and peak memory per execution provider and bundle",
        description="Benchmark inferences and training steps for each chosen execution provider and "
        "bundle (e.g. fp32 and int8), each pair in a fresh process: p50/p90/p99 latency, per-second "
        "throughput and peak RSS, where the nodes ran (share on the provider, operators left on the CPU) "
        "and, with --fidelity-eps, how well a training step's derivatives d_k through the provider "
        "agree with the fp32 CPU ones for each eps.",
    )
    b.add_argument("bundles", nargs="+", metavar="BUNDLE")
    b.add_argument("--providers", help="comma-separated providers (cpu, xnnpack, ... or full names; NPU plugins: "
                   "qnn-htp, openvino, openvino-npu, ...), or 'all'")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--count", type=int, default=20, help="timed inferences (default 20)")
    b.add_argument("--train-count", type=int, default=5, help="timed training steps (default 5)")
    b.add_argument("--duration", type=float, default=0.0, help="seconds per phase instead of counts")
    b.add_argument("--k", type=int, default=4)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--sequence-length", type=int, default=128)
    b.add_argument("--fidelity-eps", default="",
                   help="comma-separated eps sweep: compare d_k through each provider with the fp32 CPU ones "
                   "(e.g. 1e-3,1e-2,1e-1; default: no check)")
    b.add_argument("--fidelity-k", type=int, default=32, help="perturbations per eps (default 32)")
    b.add_argument("--data", help="the device's data for the batch (IDX, .csv, .npz; default: synthetic)")
    add_runtime_args(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bench)

    pr = dsub.add_parser("providers", help="list the execution providers this onnxruntime offers")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=_providers)

    try:
        from fwdfleet.cli.device_run_cmd import register_run
    except ImportError:
        pass
    else:
        register_run(dsub)


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", default="cpu", help="comma-separated execution providers (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: automatic)")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _train(args: argparse.Namespace) -> int:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.data import load_dataset
    from fwdfleet.device_runtime.session import BundleSession, SessionOptions
    from fwdfleet.device_runtime.train import LocalTrainConfig, train_local

    try:
        config = LocalTrainConfig(
            steps=args.steps, num_perturbations=args.k, eps=args.eps, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, schedule=args.schedule, difference=args.difference, eval_every=args.eval_every,
            eval_examples=args.eval_examples,
        )  # fmt: skip
        options = SessionOptions(providers=tuple(args.providers.split(",")), intra_op_threads=args.threads)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    bundle = load_bundle(args.bundle)
    session = BundleSession(bundle, options)
    data = load_dataset(args.data, bundle, split=args.split, label_column=args.label_column)
    if args.eval_data:
        train_data, eval_data = data, load_dataset(args.eval_data, bundle, label_column=args.label_column)
    else:
        train_data, eval_data = data.split(args.eval_fraction, seed=args.seed)
    print(
        f"training {bundle.manifest.kind} bundle ({bundle.manifest.num_trainable:,} trainable values) on "
        f"{len(train_data):,} examples, evaluating on {len(eval_data):,}; K={config.num_perturbations} "
        f"eps={config.eps} lr={config.lr} batch={config.batch_size}",
        file=sys.stderr,
    )
    trainer = session if args.train_graph == "model" else BundleSession(bundle, options, graph=args.train_graph)
    report = train_local(session, train_data, config, eval_data=eval_data, out=args.out,
                         progress=not args.no_progress, trainer=trainer)  # fmt: skip
    first, last = report.evaluations[0], report.evaluations[-1]
    if args.json:
        print(json.dumps({
            "steps": report.steps_done, "seconds": report.seconds, "interrupted": report.interrupted,
            "skipped_perturbations": report.skipped_perturbations,
            "saved_to": str(report.saved_to) if report.saved_to else None,
            "evaluations": [e.to_json(bundle.manifest.labels) for e in report.evaluations],
        }, indent=2))  # fmt: skip
    else:
        print(
            f"{report.steps_done} steps in {report.seconds:.1f} s: eval loss {first.loss:.4f} -> {last.loss:.4f}, "
            f"accuracy {100 * first.accuracy:.2f}% -> {100 * last.accuracy:.2f}%, macro-F1 "
            f"{100 * first.macro_f1:.2f}% -> {100 * last.macro_f1:.2f}%; {report.skipped_perturbations} "
            "perturbations skipped (non-finite loss)"
        )
        if last.classification is not None:
            print(last.classification.format(bundle.manifest.labels))
        if report.saved_to:
            print(f"saved the trained bundle to {report.saved_to}")
    return 130 if report.interrupted else 0


def _runtime_options(args: argparse.Namespace) -> Any:
    from fwdfleet.device_runtime.memory import RuntimeOptions

    try:
        return RuntimeOptions.from_args(args)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _memory(args: argparse.Namespace) -> int:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.memory import measure_memory
    from fwdfleet.export.torch_memory import WORKERS  # names torch's worker; imports no torch

    _positive(args, "batch_size", "sequence_length", "k")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(WORKERS))
    if unknown or not modes:
        raise ConfigError(f"--modes {args.modes!r}: choose a comma-separated subset of {', '.join(WORKERS)}")
    options = _runtime_options(args)
    bundle = load_bundle(args.bundle)  # fail fast, in this process, on a corrupt bundle
    report = measure_memory(
        bundle.path, batch_size=args.batch_size, sequence_length=args.sequence_length,
        num_perturbations=args.k, options=options, modes=modes, workers=WORKERS,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    m = bundle.manifest
    o = options
    print(
        f"bundle {bundle.path} ({m.kind}, {m.quantization or 'fp32'}), batch {args.batch_size}, sequence "
        f"{args.sequence_length}, K={args.k}; peak RSS (VmHWM), fresh process each; arena "
        f"{'on' if o.enable_cpu_mem_arena else 'off'}, memory pattern {'on' if o.enable_mem_pattern else 'off'}, "
        f"prepacking {'off' if o.disable_prepacking else 'on'}, optimization {o.graph_optimization}"
    )
    print(f"{'mode':<10} {'peak MB':>9} {'after imports':>14} {'seconds':>9}  note")
    for f in report.figures:
        peak = f"{f.peak_mb:9.1f}" if f.peak_mb is not None else f"{'n/a':>9}"
        base = f"{f.baseline_mb:14.1f}" if f.baseline_mb is not None else f"{'':>14}"
        secs = f"{f.seconds:9.3f}" if f.seconds is not None else f"{'':>9}"
        print(f"{f.mode:<10} {peak} {base} {secs}  {f.note}")
        if f.stages:
            print(f"{'':<10} stages (peak MB): " + ", ".join(f"{k} {v:.1f}" for k, v in f.stages.items()))
    ratio = report.train_over_inference
    if ratio is not None:
        print(f"training step / inference peak: {ratio:.3f}x")
    if report.torch_over_train is not None:
        print(f"torch backprop / training step peak: {report.torch_over_train:.2f}x")
    if report.torch_ckpt_over_train is not None:
        print(f"torch backprop with checkpointing / training step peak: {report.torch_ckpt_over_train:.2f}x")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.bench import benchmark, format_table, local_providers, to_json

    _positive(args, "count", "train_count", "k", "batch_size", "sequence_length")
    if args.warmup < 0 or args.duration < 0:
        raise ConfigError("--warmup and --duration must be >= 0")
    bundles = [load_bundle(b).path for b in args.bundles]
    try:
        sweep = [float(e) for e in args.fidelity_eps.split(",") if e.strip()]
    except ValueError as e:
        raise ConfigError(f"--fidelity-eps {args.fidelity_eps!r}: give comma-separated numbers like 1e-3,1e-2") from e
    if any(not e > 0 for e in sweep) or args.fidelity_k < 2:
        raise ConfigError("--fidelity-eps values must be > 0 and --fidelity-k >= 2")
    if args.providers == "all":
        providers = local_providers()
    elif args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    else:
        providers = None
    results = benchmark(
        bundles, providers, warmup=args.warmup, count=args.count, train_count=args.train_count,
        duration=args.duration, num_perturbations=args.k, batch_size=args.batch_size,
        sequence_length=args.sequence_length, options=_runtime_options(args), fidelity_eps=sweep,
        fidelity_k=args.fidelity_k, data=args.data,
    )  # fmt: skip
    print(json.dumps(to_json(results), indent=2) if args.json else format_table(results))
    return 1 if any(r.error for r in results) else 0


def _providers(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from fwdfleet.device_runtime.bench import REMOTE_PROVIDERS
    from fwdfleet.device_runtime.session import PLUGIN_PROVIDERS, available_providers

    have = available_providers()
    plugins = {name: ("installed" if p.installed() else f"not installed: pip install {p.pip}")
               for name, p in PLUGIN_PROVIDERS.items()}
    if args.json:
        print(json.dumps({"onnxruntime": ort.__version__, "device": ort.get_device(), "providers": have,
                          "plugins": plugins}))
        return 0
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}) offers:")
    for p in have:
        print(f"  {p}{'  (remote; not benchmarked)' if p in REMOTE_PROVIDERS else ''}")
    print("plugin providers (--providers NAME):")
    for name, state in plugins.items():
        print(f"  {name:<14} {state}")
    return 0
