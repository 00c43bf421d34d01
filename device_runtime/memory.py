"""Peak memory of inference, of a perturbed-inference training step and of a torch backprop step.

Each figure is the peak resident set size (``VmHWM`` in ``/proc/self/status``) of a **fresh**
Python process that loads the bundle and does one thing, so the figures do not contaminate each
other. ``tracemalloc`` is never used: it cannot see onnxruntime's (C++) allocations.

* ``inference``: one session, two forwards of a batch (the first allocates the arena);
* ``train``: one session, one training step: K central-difference estimates (2K forwards) and
  the SGD update regenerated from the seeds;
* ``torch`` (only where torch and the export extra are installed): the bundle's torch twin
  (``export.rebuild.torch_twin_from_bundle``), forward + backward + AdamW step on the same
  batch. torch is imported inside that subprocess only; the device runtime never imports it.

``python -m device_runtime.memory BUNDLE --mode MODE ...`` is the worker; :func:`measure_memory`
runs the workers and collects their JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("inference", "train", "torch")


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
class MemoryFigure:
    mode: str
    peak_mb: float | None  # None: not measured (see note)
    baseline_mb: float | None = None  # peak after imports, before the bundle is loaded
    seconds: float | None = None  # time of the measured work (not of the process)
    note: str = ""


@dataclass(frozen=True)
class MemoryReport:
    bundle: str
    batch_size: int
    sequence_length: int
    num_perturbations: int
    figures: tuple[MemoryFigure, ...]

    def figure(self, mode: str) -> MemoryFigure:
        return next(f for f in self.figures if f.mode == mode)

    @property
    def train_over_inference(self) -> float | None:
        inf, tr = self.figure("inference").peak_mb, self.figure("train").peak_mb
        return tr / inf if inf and tr else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_over_inference"] = self.train_over_inference
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
    threads: int = 0,
    modes: Sequence[str] = MODES,
    timeout: float = 600.0,
) -> MemoryReport:
    """Measure each mode in its own fresh process."""
    figures = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown memory mode {mode!r}; choose from {MODES}")
        args = [str(bundle), "--mode", mode, "--batch-size", str(batch_size), "--sequence-length",
                str(sequence_length), "--k", str(num_perturbations), "--threads", str(threads)]  # fmt: skip
        r = run_worker("device_runtime.memory", args, timeout)
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
                )
            )
    return MemoryReport(str(bundle), batch_size, sequence_length, num_perturbations, tuple(figures))


# ------------------------------------------------------------------------------------------ worker


def _ort_work(mode: str, bundle_path: str, batch_size: int, seq: int, k: int, threads: int) -> tuple[float, str]:
    from device_runtime.data import synthetic_batch
    from device_runtime.estimator import EstimatorWorkspace, accumulate_update, estimate
    from device_runtime.perturbation import flatten, split
    from device_runtime.session import BundleSession, SessionOptions
    from device_runtime.task import RoundTask
    from fwdfleet.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=threads))
    trainables = bundle.load_trainables()
    batch = synthetic_batch(bundle, batch_size, sequence_length=seq)
    start = time.perf_counter()
    if mode == "inference":
        for _ in range(2):
            session.run(trainables, batch, ("loss",))
        return time.perf_counter() - start, "2 forwards"
    ws = EstimatorWorkspace(session.trainable_specs)
    w = flatten(trainables, session.trainable_specs)
    del trainables  # the flat vector holds them now: one copy of the trainables, as in inference
    current = split(w, session.trainable_specs)
    task = RoundTask(round_id=0, model_version=0, round_seed=1234, device_index=0, num_perturbations=k)
    result = estimate(session, current, batch, task, workspace=ws)
    accumulate_update(result, task, ws.n, scale=-1e-3 / max(1, len(result.indices)), out=w, buffer=ws.z)
    return time.perf_counter() - start, f"{int(result.extras['passes'])} forwards + update"


def _torch_work(bundle_path: str, batch_size: int, seq: int, threads: int) -> tuple[float, str]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("torch is not installed (pip install 'fwdfleet[export]')")
    try:
        from export.rebuild import torch_twin_from_bundle  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise RuntimeError(f"export.rebuild is not available ({e})") from e
    import torch

    from device_runtime.data import synthetic_batch
    from fwdfleet.bundle import load_bundle

    if threads:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_path)
    model = torch_twin_from_bundle(bundle)
    batch = {k: torch.from_numpy(v) for k, v in synthetic_batch(bundle, batch_size, sequence_length=seq).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    start = time.perf_counter()
    loss = model(**batch).mean()
    loss.backward()
    opt.step()
    return time.perf_counter() - start, f"forward + backward + AdamW over {sum(p.numel() for p in params):,} values"


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_runtime.memory", description=__doc__)
    p.add_argument("bundle")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.mode != "torch":
        import numpy  # noqa: F401  (counted in the baseline, as a device always has it loaded)
        import onnxruntime  # noqa: F401
    baseline = peak_rss_kb()
    try:
        if a.mode == "torch":
            seconds, note = _torch_work(a.bundle, a.batch_size, a.sequence_length, a.threads)
        else:
            seconds, note = _ort_work(a.mode, a.bundle, a.batch_size, a.sequence_length, a.k, a.threads)
    except Exception as e:  # reported to the parent as a one-line reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0]}))
        return 0
    print(json.dumps({"mode": a.mode, "peak_kb": peak_rss_kb(), "baseline_kb": baseline, "seconds": seconds,
                      "note": note}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(_main())
