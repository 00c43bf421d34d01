"""Peak memory of inference, of a perturbed-inference training step and of a torch backprop step.

Each figure is the peak resident set size (``VmHWM`` in ``/proc/self/status``) of a **fresh**
Python process that loads the bundle and does one thing, so the figures do not contaminate each
other. ``tracemalloc`` is never used: it cannot see onnxruntime's (C++) allocations. VmHWM
counts file-backed pages too, so weights memory-mapped from external data count once touched.

* ``inference``: one session, two forwards of a batch (the first allocates the arena);
* ``train``: one session, one training step: K central-difference estimates (2K forwards) and
  the SGD update regenerated from the seeds, with the trainables held as one flat vector;
* ``torch`` and ``torch-ckpt`` (backprop's baselines, where the export extra is installed): their
  worker is :mod:`fwdfleet.export.torch_memory` (the device runtime never imports torch); a
  caller names it in ``workers`` (:data:`fwdfleet.export.torch_memory.WORKERS` holds every mode).

Every worker also records the peak after each stage (interpreter, numpy, onnxruntime or torch,
our modules, session or model built), so the import baseline is reported apart from the work.
Token ids of the synthetic batch are drawn over the whole vocabulary (when the bundle's
tokenizer tells its size) so that a memory-mapped embedding table is paged in as by real text
or worse.

``python -m fwdfleet.device_runtime.memory BUNDLE --mode MODE ...`` is the worker of the device's
modes; :func:`measure_memory` runs a worker per mode and collects their JSON. A worker is any
module whose ``main`` parses :func:`worker_parser`'s arguments and prints :func:`report_peak`'s line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # the worker measures its imports: onnxruntime is imported where it is used
    from fwdfleet.device_runtime.session import GraphOptimization, SessionOptions

WORKER = "fwdfleet.device_runtime.memory"
# mode -> the module whose process measures it (the device's own modes; torch's live in export)
DEVICE_WORKERS: Mapping[str, str] = {"inference": WORKER, "train": WORKER}
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss // 1024) if sys.platform == "darwin" else int(maxrss)


@dataclass(frozen=True)
class RuntimeOptions:
    """The session and estimator settings a memory or benchmark worker runs with (see
    :class:`device_runtime.session.SessionOptions` for what each costs)."""

    threads: int = 0
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = False
    disable_prepacking: bool = False
    graph_optimization: str = "all"
    allow_spinning: bool = False
    chunk: int = 1 << 16  # z values generated at a time by the estimator
    train_graph: str = "model"  # the graph of training steps ("model_stack": several points per call)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"RuntimeOptions.threads must be >= 0 (0: automatic), got {self.threads}")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(f"RuntimeOptions.graph_optimization must be one of {GRAPH_OPTIMIZATIONS}")
        if self.chunk < 1:
            raise ValueError(f"RuntimeOptions.chunk must be >= 1, got {self.chunk}")

    def to_args(self) -> list[str]:
        args = ["--threads", str(self.threads), "--graph-optimization", self.graph_optimization]
        args += ["--chunk", str(self.chunk), "--train-graph", self.train_graph]
        args += [] if self.enable_cpu_mem_arena else ["--no-arena"]
        args += ["--mem-pattern"] if self.enable_mem_pattern else []
        args += ["--no-prepacking"] if self.disable_prepacking else []
        args += ["--spinning"] if self.allow_spinning else []
        return args

    def session_options(self) -> SessionOptions:
        from fwdfleet.device_runtime.session import SessionOptions  # imports onnxruntime: not at module level

        return SessionOptions(intra_op_threads=self.threads, enable_cpu_mem_arena=self.enable_cpu_mem_arena,
                              enable_mem_pattern=self.enable_mem_pattern, disable_prepacking=self.disable_prepacking,
                              graph_optimization=cast("GraphOptimization", self.graph_optimization),
                              allow_spinning=self.allow_spinning)  # fmt: skip

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> RuntimeOptions:
        return cls(
            threads=a.threads,
            enable_cpu_mem_arena=not a.no_arena,
            enable_mem_pattern=a.mem_pattern,
            disable_prepacking=a.no_prepacking,
            graph_optimization=a.graph_optimization,
            allow_spinning=a.spinning,
            chunk=a.chunk,
            train_graph=a.train_graph,
        )


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The worker and CLI flags of :class:`RuntimeOptions` (defaults: the memory-friendly ones)."""
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: automatic)")
    p.add_argument("--no-arena", action="store_true", help="disable onnxruntime's CPU memory arena")
    p.add_argument("--mem-pattern", action="store_true", help="enable onnxruntime's memory pattern (more memory)")
    p.add_argument("--no-prepacking", action="store_true", help="do not keep pre-packed copies of constant weights")
    p.add_argument("--graph-optimization", choices=GRAPH_OPTIMIZATIONS, default="all")
    p.add_argument("--spinning", action="store_true", help="let onnxruntime's intra-op threads spin between runs "
                   "(its default; off here: it slows the perturbation arithmetic on few cores)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=1 << 16, help="perturbation values generated at a time")
    p.add_argument("--train-graph", default="model", help="graph of the training steps: 'model_stack' evaluates "
                   "several perturbed points per call (add it with `fwdfleet export stack`)")  # fmt: skip


@dataclass(frozen=True)
class MemoryFigure:
    mode: str
    peak_mb: float | None  # None: not measured (see note)
    baseline_mb: float | None = None  # peak after all imports, before the bundle is loaded
    seconds: float | None = None  # time of the measured work (not of the process)
    note: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # peak MB after each stage, in order


@dataclass(frozen=True)
class MemoryReport:
    bundle: str
    batch_size: int
    sequence_length: int
    num_perturbations: int
    figures: tuple[MemoryFigure, ...]
    options: RuntimeOptions = field(default_factory=RuntimeOptions)

    def figure(self, mode: str) -> MemoryFigure:
        return next(f for f in self.figures if f.mode == mode)

    def _ratio(self, top: str, bottom: str) -> float | None:
        modes = {f.mode: f.peak_mb for f in self.figures}
        a, b = modes.get(top), modes.get(bottom)
        return a / b if a and b else None

    @property
    def train_over_inference(self) -> float | None:
        return self._ratio("train", "inference")

    @property
    def torch_over_train(self) -> float | None:
        return self._ratio("torch", "train")

    @property
    def torch_ckpt_over_train(self) -> float | None:
        return self._ratio("torch-ckpt", "train")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_over_inference"] = self.train_over_inference
        d["torch_over_train"] = self.torch_over_train
        d["torch_ckpt_over_train"] = self.torch_ckpt_over_train
        return d


def run_worker(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process and parse the JSON object it prints last."""
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def measure_memory(
    bundle: str | Path,
    *,
    batch_size: int = 16,
    sequence_length: int = 128,
    num_perturbations: int = 4,
    options: RuntimeOptions | None = None,
    modes: Sequence[str] = tuple(DEVICE_WORKERS),
    workers: Mapping[str, str] = DEVICE_WORKERS,
    timeout: float = 600.0,
) -> MemoryReport:
    """Measure each mode in its own fresh process (``workers``: mode -> worker module)."""
    opts = options if options is not None else RuntimeOptions()
    figures = []
    for mode in modes:
        if mode not in workers:
            raise ValueError(f"unknown memory mode {mode!r}; choose from {tuple(workers)}")
        args = [str(bundle), "--mode", mode, "--batch-size", str(batch_size), "--sequence-length",
                str(sequence_length), "--k", str(num_perturbations), *opts.to_args()]  # fmt: skip
        r = run_worker(workers[mode], args, timeout)
        if "error" in r:
            figures.append(MemoryFigure(mode=mode, peak_mb=None, note=f"n/a: {r['error']}"))
        else:
            figures.append(
                MemoryFigure(
                    mode=mode,
                    peak_mb=r["peak_kb"] / 1024.0,
                    baseline_mb=r["baseline_kb"] / 1024.0,
                    seconds=r["seconds"],
                    note=r.get("note", ""),
                    stages={k: v / 1024.0 for k, v in r.get("stages_kb", {}).items()},
                )
            )
    return MemoryReport(str(bundle), batch_size, sequence_length, num_perturbations, tuple(figures), opts)


# ------------------------------------------------------------------------------------------ worker


def worker_batch(bundle: Any, batch_size: int, seq: int, graph: str = "model") -> dict[str, Any]:
    """A synthetic batch for ``graph`` whose token ids span the whole vocabulary (see the module doc)."""
    import numpy as np

    from fwdfleet.device_runtime.data import synthetic_batch, vocabulary_size

    batch = synthetic_batch(bundle, batch_size, graph=graph, sequence_length=seq)
    vocab = vocabulary_size(bundle)
    if vocab and vocab > 1000 and "input_ids" in batch:
        ids = batch["input_ids"]
        batch["input_ids"] = np.random.default_rng(1).integers(5, vocab, size=ids.shape).astype(ids.dtype)
    return batch


def _ort_work(
    mode: str, bundle_path: str, batch_size: int, seq: int, k: int, opts: RuntimeOptions, stages: dict[str, int]
) -> tuple[float, str]:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.estimator import EstimatorWorkspace, accumulate_update, estimate, load_flat_trainables
    from fwdfleet.device_runtime.session import BundleSession
    from fwdfleet.perturbation import split
    from fwdfleet.task import RoundTask

    stages["runtime modules"] = peak_rss_kb()
    bundle = load_bundle(bundle_path)
    session = BundleSession(bundle, opts.session_options(), graph="model" if mode == "inference" else opts.train_graph)
    stages["session created"] = peak_rss_kb()
    batch = worker_batch(bundle, batch_size, seq, graph=session.graph.name)
    start = time.perf_counter()
    if mode == "inference":
        trainables = bundle.load_trainables()
        for _ in range(2):
            session.run(trainables, batch, ("loss",))
        return time.perf_counter() - start, "2 forwards"
    w = load_flat_trainables(bundle, session.trainable_specs)  # the one copy of the trainables
    current = split(w, session.trainable_specs)
    ws = EstimatorWorkspace(session.trainable_specs, chunk=opts.chunk)
    task = RoundTask(round_id=0, model_version=0, round_seed=1234, device_index=0, num_perturbations=k)
    result = estimate(session, current, batch, task, workspace=ws)
    accumulate_update(result, task, ws.n, scale=-1e-3 / max(1, len(result.indices)), out=w, buffer=ws.z)
    copied = " (trainables copied)" if ws.copies_trainables else ""
    return time.perf_counter() - start, f"{int(result.extras['passes'])} forwards + update{copied}"


def worker_parser(prog: str, modes: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every memory worker takes (what :func:`measure_memory` passes)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("bundle")
    p.add_argument("--mode", choices=modes, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    add_runtime_args(p)
    return p


def run_worker_main(prog: str, modes: Sequence[str], work: Callable[[argparse.Namespace, dict[str, int]],
                    tuple[float, str]], argv: Sequence[str] | None = None) -> int:
    """A memory worker's ``main``: parse :func:`worker_parser`'s arguments, do ``work(args, stages)``
    (seconds, note) and print the peak after it, or the failure as the one-line reason
    :func:`measure_memory` turns into a note. Always exits 0: the parent reads the JSON line."""
    stages = {"interpreter": peak_rss_kb()}
    a = worker_parser(prog, modes).parse_args(argv)
    try:
        seconds, note = work(a, stages)
    except Exception as e:  # reported to the parent as a one-line reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0]}))
        return 0
    stages["peak"] = peak_rss_kb()
    print(json.dumps({"mode": a.mode, "peak_kb": stages["peak"], "baseline_kb": stages["runtime modules"],
                      "seconds": seconds, "note": note, "stages_kb": stages}))  # fmt: skip
    return 0


def _device_work(a: argparse.Namespace, stages: dict[str, int]) -> tuple[float, str]:
    opts = RuntimeOptions.from_args(a)
    import numpy  # noqa: F401  (counted in the baseline, as a device always has it loaded)

    stages["numpy"] = peak_rss_kb()
    import onnxruntime  # noqa: F401

    stages["onnxruntime"] = peak_rss_kb()
    return _ort_work(a.mode, a.bundle, a.batch_size, a.sequence_length, a.k, opts, stages)


if __name__ == "__main__":
    sys.exit(run_worker_main(f"python -m {WORKER}", tuple(DEVICE_WORKERS), _device_work))
