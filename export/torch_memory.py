"""Backprop's memory baselines for ``fwdfleet device memory``: the bundle's torch twin trained one step.

The worker behind the ``torch`` and ``torch-ckpt`` modes of
:func:`fwdfleet.device_runtime.memory.measure_memory` (torch lives in export, never in the device
runtime): ``python -m fwdfleet.export.torch_memory BUNDLE --mode torch ...`` loads the bundle's
torch twin (:func:`fwdfleet.export.rebuild.torch_twin_from_bundle`) and runs forward + backward +
AdamW on the same synthetic batch as the device's modes, printing the same JSON line.

* ``torch``: plain backprop;
* ``torch-ckpt``: gradient checkpointing on every Hugging Face model inside the twin (activations
  recomputed in the backward pass instead of kept): backprop's best case for memory.

Importing this module does not import torch; :data:`WORKERS` maps every mode (the device's and
torch's) to its worker, for callers that want them all.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fwdfleet.device_runtime.memory import DEVICE_WORKERS, peak_rss_kb, run_worker_main, worker_batch

WORKER = "fwdfleet.export.torch_memory"
TORCH_MODES = ("torch", "torch-ckpt")
WORKERS: Mapping[str, str] = {**DEVICE_WORKERS, **dict.fromkeys(TORCH_MODES, WORKER)}


def torch_step(bundle_path: str, batch_size: int, seq: int, threads: int, stages: dict[str, int],
               checkpointing: bool = False) -> tuple[float, str]:
    """One forward + backward + AdamW step of the bundle's torch twin; (seconds, note)."""
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("torch is not installed (pip install torch==2.13.0 && pip install 'fwdfleet[export]')")
    import torch

    stages["torch"] = peak_rss_kb()
    from fwdfleet.bundle import load_bundle
    from fwdfleet.export.rebuild import torch_twin_from_bundle

    stages["runtime modules"] = peak_rss_kb()
    if threads:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_path)
    model = torch_twin_from_bundle(bundle)
    if checkpointing:
        found: list[Any] = [getattr(m, "gradient_checkpointing_enable", None) for m in model.modules()]
        enables = [f for f in found if callable(f)]
        if not enables:
            raise RuntimeError("torch-ckpt needs a Hugging Face model inside the bundle's torch twin")
        for enable in enables:  # non-reentrant: LoRA inputs need no requires_grad trick on frozen embeddings
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # Hugging Face checkpoints only in training mode (these models have no dropout at p > 0)
    stages["model built"] = peak_rss_kb()
    batch = {k: torch.from_numpy(v) for k, v in worker_batch(bundle, batch_size, seq).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    start = time.perf_counter()
    loss = model(**batch).mean()
    stages["forward"] = peak_rss_kb()
    loss.backward()
    opt.step()
    how = " with gradient checkpointing" if checkpointing else ""
    values = sum(p.numel() for p in params)
    return time.perf_counter() - start, f"forward + backward{how} + AdamW over {values:,} values"


def _work(a: argparse.Namespace, stages: dict[str, int]) -> tuple[float, str]:
    ckpt = a.mode == "torch-ckpt"
    return torch_step(a.bundle, a.batch_size, a.sequence_length, a.threads, stages, checkpointing=ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker_main(f"python -m {WORKER}", TORCH_MODES, _work, argv)


if __name__ == "__main__":
    sys.exit(main())
