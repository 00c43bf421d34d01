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
   and the compact estimate 8 bytes per (k, d_k) + 40 fixed.

    python benchmarks/device_step.py BUNDLE [BUNDLE ...] [--batch-size 16] [--sequence-length 128]
        [--k 4] [--repeats 3] [--torch] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.data import synthetic_batch
from device_runtime.estimator import EstimatorWorkspace, accumulate_update, estimate, uplink_bytes
from device_runtime.memory import measure_memory
from device_runtime.perturbation import flatten, perturbation, random_words, split
from device_runtime.session import BundleSession, SessionOptions
from device_runtime.task import DeviceResult, RoundTask
from fwdfleet.bundle import load_bundle


def _task(k: int, step: int) -> RoundTask:
    return RoundTask(round_id=step, model_version=0, round_seed=2024, device_index=1, num_perturbations=k,
                     k_start=k * step)  # fmt: skip


def time_step(path: Path, batch_size: int, seq: int, k: int, repeats: int, threads: int) -> dict[str, Any]:
    bundle = load_bundle(path)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=threads))
    batch = synthetic_batch(bundle, batch_size, sequence_length=seq)
    ws = EstimatorWorkspace(session.trainable_specs)
    w = flatten(bundle.load_trainables(), session.trainable_specs)
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
    gen = []
    for i in range(3):
        t = time.perf_counter()
        perturbation(7, 0, i, ws.n, out=ws.z)
        gen.append(time.perf_counter() - t)
    step_s, perturb_s, update_s = float(np.median(steps)), float(np.median(perturb)), float(np.median(update))
    return {
        "kind": bundle.manifest.kind,
        "quantization": bundle.manifest.quantization or "fp32",
        "num_trainable": ws.n,
        "k": k,
        "forward_seconds": float(np.median(forward)),
        "step_seconds": step_s,
        "perturbation_seconds": perturb_s,
        "perturbation_share": perturb_s / step_s,
        "update_seconds": update_s,
        "perturbation_and_update_share": (perturb_s + update_s) / (step_s + update_s),
        "generate_one_z_seconds": float(np.median(gen)),
        "last_result": result,
    }


def rademacher_without_temporary(round_seed: int, device: int, k: int, n: int, out: np.ndarray) -> np.ndarray:
    """Proposed change to ``device_runtime.perturbation.perturbation`` (Rademacher branch): write
    ``1 - 2 * bit`` into ``out`` in place instead of through an n-sized float32 temporary
    (``np.float32(2.0) * bits``). Same values bit for bit; checked by :func:`compare_generators`."""
    words = random_words(round_seed, device, k, (n + 31) // 32)
    bits = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")[:n]
    np.multiply(bits, np.float32(-2.0), out=out, casting="unsafe")
    out += np.float32(1.0)
    return out


def compare_generators(n: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the current generator and of the proposed in-place variant, into a warm buffer."""
    a, b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    cur, new = [], []
    for i in range(repeats):
        t = time.perf_counter()
        perturbation(11, 0, i, n, out=a)
        cur.append(time.perf_counter() - t)
        t = time.perf_counter()
        rademacher_without_temporary(11, 0, i, n, b)
        new.append(time.perf_counter() - t)
        if not np.array_equal(a, b):
            raise AssertionError("the proposed generator differs from device_runtime.perturbation")
    return {"n": float(n), "current_seconds": float(np.median(cur)), "proposed_seconds": float(np.median(new))}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="perturbations per timed/measured step")
    p.add_argument("--uplink-ks", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--torch", action="store_true", help="also measure a torch backprop step (needs the export extra)")
    p.add_argument(
        "--generator-n",
        type=int,
        default=13_600_000,
        help="also time generating one Rademacher z of this size, current vs proposed (0: skip)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ks = [int(v) for v in a.uplink_ks.split(",")]
    report = []
    for path in a.bundles:
        modes = ("inference", "train", "torch") if a.torch else ("inference", "train")
        mem = measure_memory(path, batch_size=a.batch_size, sequence_length=a.sequence_length,
                             num_perturbations=a.k, threads=a.threads, modes=modes)  # fmt: skip
        timing = time_step(path, a.batch_size, a.sequence_length, a.k, a.repeats, a.threads)
        result = timing.pop("last_result")
        entry: dict[str, Any] = {
            "bundle": str(path),
            "memory": mem.to_json(),
            "timing": timing,
            "uplink": uplink(result, ks),
        }
        report.append(entry)
        if not a.json:
            inf, tr = mem.figure("inference"), mem.figure("train")
            t = timing
            print(f"== {path} ({t['kind']}, {t['quantization']}, {t['num_trainable']:,} trainable values; "
                  f"batch {a.batch_size}, sequence {a.sequence_length}, K={a.k})")  # fmt: skip
            ratio = mem.train_over_inference
            print(f"peak RSS: inference {inf.peak_mb or 0:.1f} MB, training step {tr.peak_mb or 0:.1f} MB, "
                  f"ratio {ratio or float('nan'):.3f}  (target <= 1.05)")  # fmt: skip
            if a.torch:
                tf = mem.figure("torch")
                print(f"torch backprop step: {tf.peak_mb or float('nan'):.1f} MB ({tf.note})")
            print(f"forward {timing['forward_seconds']:.4f} s; step {timing['step_seconds']:.4f} s; perturbation "
                  f"generation+bookkeeping {timing['perturbation_seconds']:.4f} s = "
                  f"{100 * timing['perturbation_share']:.2f}% of the step (target < 10%); with the update "
                  f"regenerated on the device: {100 * timing['perturbation_and_update_share']:.2f}%")  # fmt: skip
            for row in entry["uplink"]:
                print(f"uplink K={row['k']:>3}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "k"))
    generator = compare_generators(a.generator_n) if a.generator_n > 0 else None
    if generator and not a.json:
        print(
            f"generating one Rademacher z of {a.generator_n:,} values into a warm buffer: current "
            f"{generator['current_seconds']:.4f} s, proposed in-place {generator['proposed_seconds']:.4f} s"
        )
    if a.json:
        print(json.dumps({"bundles": report, "generator": generator}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
