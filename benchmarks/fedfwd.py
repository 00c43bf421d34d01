"""FedFwd against FedAvg-backprop: federated Forward-Forward MLPs on Fashion-MNIST (or digits).

Ten devices (IID, and Dirichlet(0.5) non-IID), the same partition, data and number of rounds for
every run. Backprop: a relu MLP ``784-H-H-10`` trained by FedAvg (torch, Adam, one local epoch
per round; :mod:`benchmarks.baselines_mlp`). Forward-Forward: an FF-MLP bundle ``784-H-H``
(``fwdfleet export ff-mlp``) trained through the real aggregator in ``fedavg`` mode
(:func:`fleet.fedfwd.run_fedfwd`), each device training every layer on its own objective for
one local epoch per round, predicting from all layers. Both sides use Adam with the same
learning rate and per-round schedule by default (``--ff-lr``/``--bp-lr``, ``--lr-schedule``).
Objectives (``--objectives`` on IID, ``--noniid-objectives`` on Dirichlet): ``pon`` (softmax head per
layer), ``sff`` (class-goodness heads, log-sum-exp), ``symmetric`` (goodness, hard negatives) and
``hinton`` (goodness with threshold, random negatives). Local training mode ``closed_form``
(each layer's own gradient in numpy) for all; ``perturbed`` (perturbed inference of the layer
graphs, K central differences per step) for the objectives in ``--perturbed-objectives``, with
a step budget per round because it costs 2K forwards per layer per step.

    OPENBLAS_NUM_THREADS=1 python benchmarks/fedfwd.py --out docs/results          # ~15 min here
    OPENBLAS_NUM_THREADS=1 python benchmarks/fedfwd.py --train-limit 0 --objectives pon \
        --noniid-objectives pon --perturbed-objectives --out docs/results --name fedfwd_full60k   # ~15 min
    python benchmarks/fedfwd.py --train-limit 0 --hidden 500,500 --rounds 50        # the full set, longer
    python benchmarks/fedfwd.py --dataset digits --rounds 10 --json                  # a minute

Writes ``<name>.json`` and ``<name>.png`` (``--name``, default ``fedfwd``) into ``--out`` when given.
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

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # multithreaded BLAS is much slower on a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff_train import FFTrainConfig
from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.fedfwd import FedFwdSettings, run_fedfwd
from fwdfleet.fleet.partition import PartitionConfig, Scheme, partition
from fwdfleet.lr_schedule import LR_SCHEDULES, LrSchedule

HEAD_OF = {"hinton": "none", "symmetric": "none", "sff": "class-goodness", "pon": "softmax"}
NEGATIVES = {"hinton": "random", "symmetric": "adaptive", "sff": "adaptive", "pon": "adaptive"}
PERTURBED_LR = {"hinton": 0.2, "symmetric": 0.2, "sff": 0.01, "pon": 0.01}  # SGD (benchmarks/ff_digits.py)


def load(dataset: str, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    name = "fashion-mnist" if dataset == "fashion" else "digits"
    data = load_split(DatasetConfig(name=name, max_train=limit, seed=seed))
    assert data.train.features is not None and data.train.labels is not None
    assert data.test.features is not None and data.test.labels is not None
    return data.train.features, data.train.labels, data.test.features, data.test.labels


def backprop_curve(sizes: tuple[int, ...], x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray,
                   shards: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.baselines_mlp import MLP, BackpropSettings, fedavg_backprop

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    records = fedavg_backprop(MLP(sizes), x, y, xt, yt, shards,
                              BackpropSettings(rounds=args.rounds, local_epochs=args.local_epochs, lr=args.bp_lr,
                                               batch_size=args.batch_size, eval_every=args.eval_every,
                                               seed=args.seed, lr_schedule=args.lr_schedule,
                                               final_lr_ratio=args.final_lr_ratio))
    return {"method": "backprop", "mode": "fedavg", "curve": [(r.round_id + 1, r.accuracy) for r in records
                                                              if r.accuracy is not None],
            "bytes_up_per_device_round": records[-1].bytes_up_per_device, "optimizer": "adam", "lr": args.bp_lr,
            "lr_schedule": args.lr_schedule, "seconds": time.perf_counter() - start}


def ff_curve(objective: str, mode: str, bundle_dir: Path, widths: tuple[int, ...], x: np.ndarray, y: np.ndarray,
             xt: np.ndarray, yt: np.ndarray, shards: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    head = HEAD_OF[objective]
    folder = bundle_dir / head
    if not folder.exists():
        export_ff_mlp(FFMLPConfig(layers=(x.shape[1], *widths), heads=head, seed=args.seed),  # type: ignore[arg-type]
                      folder)
    bundle = load_bundle(folder)
    perturbed = mode == "perturbed"
    config = FFTrainConfig(objective=objective, negatives=NEGATIVES[objective], mode=mode,  # type: ignore[arg-type]
                           batch_size=args.batch_size, epochs=args.local_epochs,
                           optimizer="sgd" if perturbed else "adam",
                           lr=PERTURBED_LR[objective] if perturbed else args.ff_lr,
                           max_steps=args.perturbed_steps if perturbed else None,
                           num_perturbations=args.k)
    rounds = args.perturbed_rounds if perturbed else args.rounds
    schedule: LrSchedule = "constant" if perturbed else args.lr_schedule
    start = time.perf_counter()
    run = run_fedfwd(bundle, config, x, y, shards,
                     FedFwdSettings(rounds=rounds, eval_every=args.eval_every,
                                    lr_schedule=schedule, final_lr_ratio=args.final_lr_ratio),
                     test=(xt, yt))
    recs = run.records
    return {"method": objective, "mode": mode, "curve": [(r.model_version, r.accuracy) for r in recs
                                                         if r.accuracy is not None],
            "bytes_up_per_device_round": recs[-1].bytes_up_per_device,
            "local_steps_per_device_round": float(np.mean(run.local_steps)),
            "optimizer": config.optimizer, "lr": config.lr, "lr_schedule": schedule,
            "k": config.num_perturbations if perturbed else None,
            "seconds": time.perf_counter() - start}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(result["partitions"])
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for run in result["partitions"][part]:
            xs, ys = zip(*run["curve"]) if run["curve"] else ((), ())
            style = "-" if run["method"] == "backprop" else ("--" if run["mode"] == "perturbed" else "-")
            lw = 2.5 if run["method"] == "backprop" else 1.5
            ax.plot(xs, [100 * v for v in ys], style, lw=lw, marker="o", ms=3,
                    label=f"{run['method']} ({run['mode']})")
        ax.set_title(f"{result['dataset']} {'-'.join(map(str, result['layers']))}, {part}, "
                     f"{result['devices']} devices")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    x, y, xt, yt = load(args.dataset, args.train_limit, args.seed)
    widths = tuple(int(w) for w in args.hidden.split(","))
    result: dict[str, Any] = {
        "dataset": args.dataset, "train": int(x.shape[0]), "test": int(xt.shape[0]), "devices": args.devices,
        "layers": [int(x.shape[1]), *widths], "rounds": args.rounds, "local_epochs": args.local_epochs,
        "batch_size": args.batch_size, "lr_schedule": args.lr_schedule, "final_lr_ratio": args.final_lr_ratio,
        "partitions": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.partitions:
            scheme: Scheme = "iid" if part == "iid" else "dirichlet"
            shards = partition(y, PartitionConfig(scheme, args.devices, alpha=args.alpha, seed=args.seed))
            runs = [backprop_curve((int(x.shape[1]), *widths, 10), x, y, xt, yt, shards, args)]
            _say(args, part, runs[-1])
            for objective in args.objectives if part == "iid" else args.noniid_objectives:
                runs.append(ff_curve(objective, "closed_form", Path(tmp), widths, x, y, xt, yt, shards, args))
                _say(args, part, runs[-1])
            if part == "iid":
                for objective in args.perturbed_objectives:
                    runs.append(ff_curve(objective, "perturbed", Path(tmp), widths, x, y, xt, yt, shards, args))
                    _say(args, part, runs[-1])
            result["partitions"][part] = runs
    result["seconds"] = time.perf_counter() - start
    return result


def _say(args: argparse.Namespace, part: str, r: dict[str, Any]) -> None:
    if not args.json:
        last = r["curve"][-1] if r["curve"] else (0, float("nan"))
        print(f"{part:<9} {r['method']:<10} {r['mode']:<12} round {last[0]:>3}  acc {100 * last[1]:5.2f}%  "
              f"{r['seconds']:6.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("fashion", "digits"), default="fashion")
    p.add_argument("--train-limit", type=int, default=20_000, help="training samples used, 0 = all (default 20000)")
    p.add_argument("--hidden", default="256,256", help="hidden widths (default: %(default)s)")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default: %(default)s)")
    p.add_argument("--partitions", nargs="+", choices=("iid", "dirichlet"), default=["iid", "dirichlet"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--objectives", nargs="+", choices=list(HEAD_OF), default=["pon", "sff", "symmetric", "hinton"])
    p.add_argument("--noniid-objectives", nargs="*", choices=list(HEAD_OF), default=["pon", "sff"],
                   help="objectives run on the Dirichlet partition (default: pon sff; the goodness objectives "
                        "take ~5 min each here)")
    p.add_argument("--ff-lr", type=float, default=1e-3,
                   help="closed-form Adam lr (default: %(default)s, the same as backprop's)")
    p.add_argument("--bp-lr", type=float, default=1e-3, help="backprop Adam lr (default: %(default)s)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="per-round local lr schedule, the same for FF (closed form) and backprop "
                        "(fwdfleet.lr_schedule.round_lr; default: %(default)s)")
    p.add_argument("--final-lr-ratio", type=float, default=0.0,
                   help="linear/cosine: the lr decays towards this fraction of the first round's "
                        "(default: %(default)s)")
    p.add_argument("--perturbed-objectives", nargs="*", choices=list(HEAD_OF), default=["pon"],
                   help="objectives also trained in perturbed mode, IID only (default: pon)")
    p.add_argument("--perturbed-rounds", type=int, default=10)
    p.add_argument("--perturbed-steps", type=int, default=8, help="local steps per round in perturbed mode")
    p.add_argument("--k", type=int, default=8, help="perturbations per step in perturbed mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for <name>.json and <name>.png")
    p.add_argument("--name", default="fedfwd", help="file name stem of the results (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if not 0.0 <= args.final_lr_ratio <= 1.0:
        p.error(f"--final-lr-ratio must be in [0, 1], got {args.final_lr_ratio}")
    result = run(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out / f"{args.name}.png")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"total {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
