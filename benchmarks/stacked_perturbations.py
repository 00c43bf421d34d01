"""Several perturbations in one session call: is it faster than one call per perturbation?

A bundle's graph takes one value per trainable tensor, so each perturbed forward is one
onnxruntime call. The alternative is a graph whose trainables carry a leading perturbation axis
of size P (``export/stack.py``, ``fwdfleet export stack``): one call evaluates the loss at P
perturbed points. This script builds that graph for a synthetic batch of each size, checks
that its P losses equal P calls of the bundle's own graph, and
times both in one process with one compute thread, interleaved.

    python benchmarks/stacked_perturbations.py BUNDLE [--stack 4 8] [--batch-size 1 4 16]
        [--sequence-length 64] [--seconds 3] [--json]

Needs the ``export`` extra (torch) to build the stacked graph; the timing uses onnxruntime only.
Here (CPU provider, one thread, interleaved on a shared machine) the stacked call was 1.06-1.2x
faster than P calls, at the price of P times the activations: an option, not the default. An NPU
whose fixed cost per call dominates may gain more: rerun with its provider (``--provider``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.device_runtime.memory import worker_batch
from fwdfleet.export.stack import STACKED_GRAPH, StackSettings, add_stacked_graph


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], seconds: float) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately (a shared machine slows both alike)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times[0]) < 3:
        for fn, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return float(np.median(times[0])), float(np.median(times[1]))


def compare(bundle: Bundle, p: int, batch_size: int, seq: int, seconds: float, provider: str) -> dict[str, Any]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(bundle.path, copy)  # the graph is added to a copy, at this configuration's shapes
        add_stacked_graph(copy, StackSettings(points=p, batch_size=batch_size, sequence_length=seq))
        stacked_bundle = load_bundle(copy)
        single = ort.InferenceSession(str(stacked_bundle.graph_path("model")), so, providers=[provider])
        multi = ort.InferenceSession(str(stacked_bundle.graph_path(STACKED_GRAPH)), so, providers=[provider])
        batch = worker_batch(stacked_bundle, batch_size, seq, graph=STACKED_GRAPH)
    rng = np.random.default_rng(p)
    values = bundle.load_trainables()
    names = stacked_bundle.manifest.graph(STACKED_GRAPH).trainables
    stacked = {n: (values[n][None] + 0.01 * rng.standard_normal((p, *values[n].shape))).astype(np.float32)
               for n in names}  # fmt: skip
    feed_multi = {**batch, **stacked}
    feeds = [{**batch, **{n: v[i] for n, v in stacked.items()}} for i in range(p)]
    singles = np.stack([np.asarray(single.run(["loss"], f)[0]) for f in feeds])
    together = np.asarray(multi.run(["loss"], feed_multi)[0])
    diff = float(np.abs(singles - together).max())
    if diff > 1e-4:
        raise AssertionError(f"stacked graph disagrees with the bundle's graph: max |diff| {diff:.2e}")
    per_call, one_call = _interleaved(lambda: [single.run(["loss"], f) for f in feeds],
                                      lambda: multi.run(["loss"], feed_multi), seconds)  # fmt: skip
    return {"stack": p, "batch_size": batch_size, "sequence_length": seq, "max_abs_diff": diff,
            "separate_calls_seconds": per_call, "stacked_call_seconds": one_call,
            "speedup": per_call / one_call}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--stack", type=int, nargs="+", default=[4, 8], help="perturbations per call (P)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sequence-length", type=int, default=64, help="for token inputs")
    p.add_argument("--seconds", type=float, default=6.0, help="timing budget per configuration")
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    bundle = load_bundle(a.bundle)
    rows = [compare(bundle, s, b, a.sequence_length, a.seconds, a.provider) for s in a.stack for b in a.batch_size]
    if a.json:
        print(json.dumps({"bundle": str(a.bundle), "kind": bundle.manifest.kind, "rows": rows}, indent=2))
        return 0
    print(f"{bundle.manifest.kind} {a.bundle} ({a.provider}, one thread)")
    for r in rows:
        print(f"P={r['stack']:>2} batch {r['batch_size']:>3}: {r['stack']} calls"
              f" {1e3 * r['separate_calls_seconds']:8.1f} ms,"
              f" one stacked call {1e3 * r['stacked_call_seconds']:8.1f} ms -> {r['speedup']:.2f}x"
              f" (max |diff| {r['max_abs_diff']:.1e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
