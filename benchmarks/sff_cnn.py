"""Scalable Forward-Forward CNN on Fashion-MNIST: block-local gradient graphs vs torch backprop.

One architecture (``--blocks``, default ``conv:1:16:pool,conv:16:32:pool,residual:32:32``: two
conv-BN-ReLU-pool blocks and a residual block, each with its 1x1-conv class-goodness head),
exported once per seed as an ``ff_cnn`` bundle (``fwdfleet export ff-cnn``):

* ``sff``: every block trained on its own SFF loss by its gradient graph ``grad_i`` run with
  onnxruntime (one thread), Adam in numpy (:func:`device_runtime.ff_cnn.train_sff`); accuracy by
  the sum of the heads' class goodness (``sum``) and by the last head (``last``);
* ``backprop``: the same blocks (same initial weights) trained end to end by torch (one thread,
  Adam, same learning rate, batches and epochs) through a global-average-pool + linear classifier
  on the last block's output (cross-entropy); the heads are not used;
* ``perturbed`` (``--perturbed``): the SFF blocks trained by perturbed inference of ``block_i``
  (K=1 central difference: 3 block-graph forwards per step, Rademacher, Adam ``--perturbed-lr``)
  for the same number of steps as ``sff``. A gradient-graph run costs about three forwards (one
  forward, a backward of about twice that), so this is the same budget of forwards; the measured
  seconds are reported too.

Settings: ``central`` (``--train-limit`` seeded training images, ``--epochs``) and ``small``
(``--small-limit`` images, ``--small-epochs``); test on the full 10,000-image test set. Memory
(``--memory``): VmHWM of a fresh process doing one training step at ``--memory-batch``: one
block's gradient graph (each block; onnxruntime, numpy Adam) vs torch backprop of the whole
network (forward, backward, Adam), plus one SFF step of all blocks in one process.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sff_cnn.py --seeds 0,1,2 --perturbed --memory \
        --out docs/results          # ~20 min on the shared 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwdfleet.device_runtime.data import load_idx_pair
from fwdfleet.device_runtime.memory import peak_rss_kb

FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_idx_pair(FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz")
    xt, yt = load_idx_pair(FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz")
    mean, std = float(x.mean()), float(x.std())
    return ((x - mean) / std).reshape(-1, 1, 28, 28), y, ((xt - mean) / std).reshape(-1, 1, 28, 28), yt


def export(blocks: str, seed: int, out: Path) -> Any:
    from fwdfleet.export.ff_cnn import KIND, FFCNNConfig, parse_blocks

    return KIND.export(FFCNNConfig(blocks=parse_blocks(blocks), seed=seed), out, overwrite=True).bundle


def run_sff(bundle: Any, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, *, epochs: int,
            batch: int, lr: float, seed: int, mode: str = "gradient") -> dict[str, Any]:
    from fwdfleet.device_runtime.ff_cnn import CNNRunner, SFFTrainConfig, evaluate_sff, train_sff

    runner = CNNRunner(bundle)
    cfg = SFFTrainConfig(epochs=epochs, batch_size=batch, lr=lr, mode=mode, seed=seed,  # type: ignore[arg-type]
                         num_perturbations=1)
    r = train_sff(bundle, x, y, cfg, runner=runner)
    acc = evaluate_sff(runner, r.trainables, r.state, xt, yt)
    return {**acc, **r.metrics, "seconds_per_step": r.metrics["seconds"] / max(1.0, r.metrics["steps"])}


def backprop_net(bundle: Any) -> Any:
    import torch

    from fwdfleet.device_runtime.ff_cnn import load_state
    from fwdfleet.export.ff_cnn import FFCNNConfig, torch_network

    cfg = FFCNNConfig.from_settings(bundle.manifest.settings)
    net = torch_network(cfg, bundle.load_trainables(), load_state(bundle))
    torch.manual_seed(cfg.seed)
    classifier = torch.nn.Linear(cfg.blocks[-1].out_channels, cfg.num_classes)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = net.blocks
            self.classifier = classifier

        def forward(self, xb: Any) -> Any:
            for block in self.blocks:
                xb = block(xb)
            return self.classifier(xb.mean(dim=(2, 3)))

    return Classifier()


def run_backprop(bundle: Any, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, *, epochs: int,
                 batch: int, lr: float, seed: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model = backprop_net(bundle)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    steps = 0
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))  # the order train_sff uses
        model.train()
        for b in range(len(x) // batch):
            idx = torch.from_numpy(order[b * batch:(b + 1) * batch])
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(xt[s:s + 500])).argmax(1) for s in range(0, len(xt), 500)])
    return {"acc": float((pred.numpy() == yt).mean()), "steps": float(steps), "seconds": seconds,
            "seconds_per_step": seconds / max(1, steps)}


# ------------------------------------------------------------------------------------ memory workers


def worker(args: argparse.Namespace) -> None:
    """One training step in this (fresh) process; prints {"peak_kb", "baseline_kb"} as JSON."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.memory_batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.memory_batch).astype(np.int64)
    from fwdfleet.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if args.worker == "torch":
        import torch

        torch.set_num_threads(1)
        model = backprop_net(bundle)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        baseline = peak_rss_kb()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
    else:
        from fwdfleet.device_runtime.ff_cnn import CNNRunner, SFFTrainConfig, block_step, load_state
        from fwdfleet.device_runtime.ff_train import AdamState

        runner = CNNRunner(bundle)
        values, state = bundle.load_trainables(), load_state(bundle)
        blocks = range(runner.num_blocks) if args.worker == "sff-all" else [int(args.worker.split("-")[1])]
        # the block's input as the block below would give it (a device of a pipeline receives it)
        shape = runner.graph(f"grad_{min(blocks)}").inputs[0].shape[1:]
        h = np.maximum(rng.standard_normal((len(y), *shape)), 0).astype(np.float32) if min(blocks) else x
        baseline = peak_rss_kb()
        for i in blocks:
            step, _ = block_step(runner, i, values, state, h, y, SFFTrainConfig(batch_size=len(y)), AdamState())
            h = step.h
    print(json.dumps({"peak_kb": peak_rss_kb(), "baseline_kb": baseline}))


def measure_memory(bundle: Path, blocks: int, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch}
    for what in ["torch", "sff-all", *(f"grad-{i}" for i in range(blocks))]:
        r = run_worker_script(["--worker", what, "--bundle", str(bundle), "--memory-batch", str(batch)])
        out[what] = {k.replace("_kb", "_mb"): v / 1024.0 for k, v in r.items()} if "error" not in r else r
    return out


def run_worker_script(args: list[str]) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="conv:1:16:pool,conv:16:32:pool,residual:32:32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--small-limit", type=int, default=1000)
    p.add_argument("--small-epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--perturbed", action="store_true", help="also the perturbed-inference variant (small setting)")
    p.add_argument("--perturbed-lr", type=float, default=1e-3)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--memory-batch", type=int, default=64)
    p.add_argument("--settings", default="central,small")
    p.add_argument("--bundle-from", help="use this exported ff_cnn bundle for every seed (the seeds then differ "
                   "in data subset and order only) instead of exporting one per seed")
    p.add_argument("--out", help="folder for sff_cnn.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    x, y, xt, yt = load_fashion()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"central": (args.train_limit, args.epochs), "small": (args.small_limit, args.small_epochs)}
    results: dict[str, Any] = {"args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            if args.bundle_from:
                from fwdfleet.bundle import load_bundle

                bundle = load_bundle(args.bundle_from)
            else:
                bundle = export(args.blocks, seed, Path(tmp) / f"b{seed}")
            if args.memory and seed == seeds[0]:
                blocks = len(bundle.manifest.settings["blocks"])
                results["memory"] = measure_memory(bundle.path, blocks, args.memory_batch)
                print(json.dumps(results["memory"]), flush=True)
            for name in args.settings.split(","):
                limit, epochs = settings[name]
                idx = np.random.default_rng(seed).permutation(len(x))[:limit]
                common = {"epochs": epochs, "batch": args.batch, "seed": seed}
                for method in ["sff", "backprop", *(["perturbed"] if args.perturbed and name == "small" else [])]:
                    if method == "sff":
                        r = run_sff(bundle, x[idx], y[idx], xt, yt, lr=args.lr, **common)
                    elif method == "perturbed":
                        r = run_sff(bundle, x[idx], y[idx], xt, yt, lr=args.perturbed_lr, mode="perturbed", **common)
                    else:
                        r = run_backprop(bundle, x[idx], y[idx], xt, yt, lr=args.lr, **common)
                    row = {"setting": name, "train_images": limit, "method": method, "seed": seed, **r}
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sff_cnn.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
