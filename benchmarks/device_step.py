"""Device training step versus inference: peak memory, perturbation overhead, uplink bytes.

For each bundle given by path (e.g. the MiniLM LoRA classifier from ``fwdfleet export seq-cls``
and an FF-MLP bundle from ``fwdfleet export ff-mlp``) this measures

1. peak RSS (VmHWM) of an inference and of a training step (K central-difference pairs plus the
   seed-regenerated update), each in a fresh process, and their ratio (target <= 1.05);
   with ``--torch``, also a torch backprop step of the bundle's torch twin;
2. the time spent generating perturbations and updating the perturbed buffers, as a share of
   the training step (target < 10%), and the time to regenerate the update from (k, d_k);
3. the bytes of one DeviceResult on the wire at K = 1..64 (target < 1 KB): the real protobuf
   (``fwdfleet.protocol.serde.result_to_proto``) with and without the diagnostic ``extras``,
   and the compact estimate 8 bytes per (k, d_k) + 40 fixed;
4. ``--compare-options``: the speed of one forward under each session-option variant relative to
   the defaults, in one process with the variants interleaved (robust to a shared machine), next
   to the peak memory of each variant's training step (fresh processes);
5. generating a perturbation as one vector versus chunk by chunk (time, and a bit-for-bit check).

    python benchmarks/device_step.py BUNDLE [BUNDLE ...] [--batch-size 16] [--sequence-length 128]
        [--k 4] [--repeats 3] [--torch] [--external-data] [--compare-options] [--json]

Memory-option flags (``--no-arena``, ``--mem-pattern``, ``--no-prepacking``,
``--graph-optimization``, ``--spinning``, ``--threads``, ``--chunk``) are those of ``fwdfleet device memory``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.bundle import Bundle, load_bundle, write_bundle
from fwdfleet.device_runtime.estimator import (
    EstimatorWorkspace,
    accumulate_update,
    estimate,
    load_flat_trainables,
    uplink_bytes,
)
from fwdfleet.device_runtime.memory import RuntimeOptions, add_runtime_args, measure_memory, worker_batch
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.export.torch_memory import WORKERS
from fwdfleet.perturbation import perturbation, perturbation_chunks, split
from fwdfleet.task import DeviceResult, RoundTask

# Session-option variants compared by --compare-options (name -> change from the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults (pattern off, arena on, no spinning)": {},
    "memory pattern on (onnxruntime's default)": {"enable_mem_pattern": True},
    "arena off": {"enable_cpu_mem_arena": False},
    "prepacking off": {"disable_prepacking": True},
    "graph optimization basic": {"graph_optimization": "basic"},
    "threads spinning (onnxruntime's default)": {"allow_spinning": True},
}


def _task(k: int, step: int) -> RoundTask:
    return RoundTask(round_id=step, model_version=0, round_seed=2024, device_index=1, num_perturbations=k,
                     k_start=k * step)  # fmt: skip


def external_data_copy(bundle: Bundle, out: Path) -> Path:
    """A copy of ``bundle`` whose graphs keep their weights as ONNX external data (``<graph>.data``)."""
    import onnx

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle.path, out)
    for g in bundle.manifest.graphs:
        model = onnx.load(str(bundle.path / g.file))
        target = out / g.file
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data", size_threshold=1024)  # fmt: skip
    (out / "manifest.json").unlink()
    write_bundle(out, bundle.manifest, bundle.load_trainables())
    return load_bundle(out).path


def time_step(path: Path, batch_size: int, seq: int, k: int, repeats: int, opts: RuntimeOptions) -> dict[str, Any]:
    bundle = load_bundle(path)
    session = BundleSession(bundle, opts.session_options())
    batch = worker_batch(bundle, batch_size, seq)
    ws = EstimatorWorkspace(session.trainable_specs, chunk=opts.chunk)
    w = load_flat_trainables(bundle, session.trainable_specs)
    current = split(w, session.trainable_specs)
    estimate(session, current, batch, _task(1, 10_000), workspace=ws)  # warm-up
    steps, perturb, update, forward = [], [], [], []
    for r in range(repeats):
        result = estimate(session, current, batch, _task(k, r), workspace=ws)
        t = time.perf_counter()
        accumulate_update(result, _task(k, r), ws.n, scale=-1e-6, out=w, buffer=ws.z)
        update.append(time.perf_counter() - t)
        steps.append(result.compute_seconds)
        perturb.append(result.extras["perturbation_seconds"])
        forward.append(result.extras["session_seconds"] / result.extras["passes"])
    step_s, perturb_s, update_s = float(np.median(steps)), float(np.median(perturb)), float(np.median(update))
    forward_s, floor_s = float(np.median(forward)), _one_pass_seconds(w, ws.wp)
    return {
        "kind": bundle.manifest.kind,
        "quantization": bundle.manifest.quantization or "fp32",
        "num_trainable": ws.n,
        "k": k,
        "forward_seconds": forward_s,
        # The least any dense perturbation costs per point: one pass writing the n trainables the
        # session reads (w0 + a constant). Its share of (forward + that pass) bounds the achievable share.
        "one_pass_seconds": floor_s,
        "one_pass_share": floor_s / (forward_s + floor_s),
        "step_seconds": step_s,
        "perturbation_seconds": perturb_s,
        "perturbation_share": perturb_s / step_s,
        "update_seconds": update_s,
        "perturbation_and_update_share": (perturb_s + update_s) / (step_s + update_s),
        "last_result": result,
    }


def _one_pass_seconds(w: np.ndarray, out: np.ndarray, repeats: int = 21) -> float:
    """Median time of ``out = w + c`` over all trainables: a lower bound on forming one perturbed point."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.add(w, np.float32(1e-3), out=out)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def compare_options(
    path: Path, batch_size: int, seq: int, k: int, rounds: int, opts: RuntimeOptions
) -> list[dict[str, Any]]:
    """Per variant: forward time relative to the defaults (interleaved in one process) and the
    training step's peak RSS (fresh process)."""
    bundle = load_bundle(path)
    base = opts.session_options()
    sessions = {name: BundleSession(bundle, replace(base, **change)) for name, change in VARIANTS.items()}
    trainables = bundle.load_trainables()
    batch = worker_batch(bundle, batch_size, seq)
    runners = {name: s.bind(trainables, batch) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in runners.values():
        r.run()
    for _ in range(rounds):
        for name, r in runners.items():
            t = time.perf_counter()
            r.run()
            times[name].append(time.perf_counter() - t)
    del runners, sessions
    ref = float(np.median(times[next(iter(VARIANTS))]))
    rows = []
    for name, change in VARIANTS.items():
        variant = RuntimeOptions(**{**vars(opts), **change})
        mem = measure_memory(path, batch_size=batch_size, sequence_length=seq, num_perturbations=k, options=variant,
                             modes=("train",))  # fmt: skip
        median = float(np.median(times[name]))
        rows.append(
            {"variant": name, "forward_seconds": median, "time_ratio": median / ref,
             "train_peak_mb": mem.figure("train").peak_mb}
        )  # fmt: skip
    return rows


def compare_generation(n: int, chunk: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds to generate one Rademacher z of ``n`` values as one vector and chunk by chunk
    (into a warm buffer); raises if the chunks differ from the vector by a single bit."""
    whole, part = np.zeros(n, np.float32), np.zeros(min(n, chunk), np.float32)
    check = np.zeros(n, np.float32)
    t_whole, t_chunks = [], []
    for i in range(repeats):
        t = time.perf_counter()
        perturbation(11, 0, i, n, out=whole)
        t_whole.append(time.perf_counter() - t)
        t = time.perf_counter()
        for start, zc in perturbation_chunks(11, 0, i, n, "rademacher", part):
            check[start : start + zc.size] = zc
        t_chunks.append(time.perf_counter() - t)
        if not np.array_equal(whole.view(np.uint32), check.view(np.uint32)):
            raise AssertionError("chunked generation differs from fwdfleet.perturbation")
    return {"n": float(n), "chunk": float(chunk), "whole_seconds": float(np.median(t_whole)),
            "chunked_seconds": float(np.median(t_chunks))}  # fmt: skip


def uplink(result: DeviceResult, ks: list[int]) -> list[dict[str, Any]]:
    try:
        from fwdfleet.protocol.serde import result_to_proto
    except ImportError:
        result_to_proto = None  # type: ignore[assignment]
    rows = []
    rng = np.random.default_rng(0)
    for k in ks:
        r = DeviceResult(
            round_id=123, model_version=45, indices=tuple(range(1000, 1000 + k)),
            derivatives=tuple(float(v) for v in rng.standard_normal(k)), num_samples=16,
            loss_mean=result.loss_mean, loss_std=result.loss_std, compute_seconds=result.compute_seconds,
            extras=dict(result.extras),
        )  # fmt: skip
        row: dict[str, Any] = {"k": k, "compact_bytes": uplink_bytes(r)}
        if result_to_proto is not None:
            row["protobuf_bytes"] = result_to_proto(r).ByteSize()
            bare = DeviceResult(**{**vars(r), "extras": {}})
            row["protobuf_bytes_no_extras"] = result_to_proto(bare).ByteSize()
        rows.append(row)
    return rows


def _print_memory(label: str, mem: Any, with_torch: bool) -> None:
    inf, tr = mem.figure("inference"), mem.figure("train")
    print(f"{label}: peak RSS inference {inf.peak_mb or 0:.1f} MB, training step {tr.peak_mb or 0:.1f} MB, ratio "
          f"{mem.train_over_inference or float('nan'):.3f} (target <= 1.05)")  # fmt: skip
    print("  import baseline (peak MB after each stage): " + ", ".join(f"{k} {v:.1f}" for k, v in tr.stages.items()))
    if with_torch:
        tf = mem.figure("torch")
        print(f"  torch backprop step {tf.peak_mb or float('nan'):.1f} MB ({tf.note}); torch / training step "
              f"{mem.torch_over_train or float('nan'):.2f}x (target >= 4)")  # fmt: skip
        if tf.stages:
            print("  torch stages: " + ", ".join(f"{k} {v:.1f}" for k, v in tf.stages.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="perturbations per timed/measured step")
    p.add_argument("--uplink-ks", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="also measure a torch backprop step (needs the export extra)")
    p.add_argument("--external-data", action="store_true", help="also measure a copy with external-data weights")
    p.add_argument("--compare-options", action="store_true", help="speed and memory of each session-option variant")
    p.add_argument("--compare-rounds", type=int, default=10, help="interleaved forwards per variant")
    p.add_argument("--generator-n", type=int, default=13_600_000,
                   help="also time generating one Rademacher z of this size, whole vs chunked (0: skip)")  # fmt: skip
    add_runtime_args(p)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    opts = RuntimeOptions.from_args(a)
    ks = [int(v) for v in a.uplink_ks.split(",")]
    modes = ("inference", "train", "torch") if a.torch else ("inference", "train")
    report: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in a.bundles:
            mem = measure_memory(path, batch_size=a.batch_size, sequence_length=a.sequence_length,
                                 num_perturbations=a.k, options=opts, modes=modes, workers=WORKERS)  # fmt: skip
            timing = time_step(path, a.batch_size, a.sequence_length, a.k, a.repeats, opts)
            result = timing.pop("last_result")
            entry: dict[str, Any] = {"bundle": str(path), "memory": mem.to_json(), "timing": timing,
                                     "uplink": uplink(result, ks)}  # fmt: skip
            ext_mem = None
            if a.external_data:
                ext = external_data_copy(load_bundle(path), Path(tmp) / f"ext_{len(report)}")
                ext_mem = measure_memory(ext, batch_size=a.batch_size, sequence_length=a.sequence_length,
                                         num_perturbations=a.k, options=opts, modes=("inference", "train"))  # fmt: skip
                entry["external_data_memory"] = ext_mem.to_json()
            if a.compare_options:
                entry["options"] = compare_options(path, a.batch_size, a.sequence_length, a.k, a.compare_rounds, opts)
            report.append(entry)
            if a.json:
                continue
            t = timing
            print(f"== {path} ({t['kind']}, {t['quantization']}, {t['num_trainable']:,} trainable values; "
                  f"batch {a.batch_size}, sequence {a.sequence_length}, K={a.k})")  # fmt: skip
            _print_memory("as exported", mem, a.torch)
            if ext_mem is not None:
                _print_memory("weights as external data", ext_mem, False)
                torch_mb, ext_train = mem.figure("torch").peak_mb if a.torch else None, ext_mem.figure("train").peak_mb
                if torch_mb and ext_train:
                    print(f"  torch / training step (external data): {torch_mb / ext_train:.2f}x")
            print(f"forward {t['forward_seconds']:.4f} s; step {t['step_seconds']:.4f} s; perturbation "
                  f"generation+bookkeeping {t['perturbation_seconds']:.4f} s = {100 * t['perturbation_share']:.2f}% "
                  f"of the step (target < 10%); with the update regenerated on the device: "
                  f"{100 * t['perturbation_and_update_share']:.2f}%")  # fmt: skip
            print(f"floor: one pass writing the trainables (w + c) takes {t['one_pass_seconds']:.5f} s = "
                  f"{100 * t['one_pass_share']:.1f}% of (forward + that pass): no dense perturbation costs less")
            for row in entry.get("options", []):
                print(f"  {row['variant']:<44} forward x{row['time_ratio']:.3f}  train peak "
                      f"{row['train_peak_mb'] or float('nan'):.1f} MB")  # fmt: skip
            for row in entry["uplink"]:
                print(f"uplink K={row['k']:>3}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "k"))
    generator = compare_generation(a.generator_n, a.chunk) if a.generator_n > 0 else None
    if generator and not a.json:
        print(f"generating one Rademacher z of {a.generator_n:,} values: whole vector {generator['whole_seconds']:.4f}"
              f" s, in chunks of {a.chunk:,} {generator['chunked_seconds']:.4f} s (bit-identical)")  # fmt: skip
    if a.json:
        print(json.dumps({"bundles": report, "generator": generator, "options": vars(opts)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
