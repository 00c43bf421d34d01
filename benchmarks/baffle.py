"""BAFFLE: training a small MLP from scratch with scalar uplinks, against FedAvg-backprop.

The model is the plain tanh MLP bundle of ``export/mlp.py`` (every weight trainable). Ten
devices (IID) run through the in-process fleet emulation (:func:`fleet.emulate.emulate`) against
the real aggregator in ``scalar`` mode: each round a device draws one minibatch, evaluates K
central differences along perturbations regenerated from the round seed and uploads only the
``(k, d_k)`` pairs; the server reconstructs ``mean d_k z_k`` and takes one SGD step. Backprop
on the bundle's torch twin, same initial weights, data and partition
(:func:`benchmarks.baselines.fedavg_backprop`):

* ``fedsgd``: each device one exact-gradient SGD step on one minibatch of the same size, same
  server learning rate: what the scalar estimate approximates, step for step;
* ``fedavg``: each device ``--fedavg-epochs`` epochs' worth of local AdamW steps (lr 3e-3) per round: the usual
  strong baseline, which also uplinks full weights.

Accuracy is reported per round and per uplinked byte (real protobuf bytes for the scalar uploads;
``4 * num_parameters`` per device-round for backprop).

    OPENBLAS_NUM_THREADS=1 python benchmarks/baffle.py --out docs/results      # ~15 min here
    python benchmarks/baffle.py --datasets digits --ks 64 --rounds 50 --json   # about a minute

Writes ``baffle.json`` and ``baffle.png`` into ``--out`` when given.
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

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp
from fwdfleet.fleet.datasets import DatasetConfig, SplitData, load_split
from fwdfleet.fleet.emulate import EmulationSettings, emulate
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile

DATASET = {"digits": "digits", "fashion": "fashion-mnist"}


def scalar_curve(bundle: Bundle, data: SplitData, shards: list[np.ndarray], k: int, rounds: int,
                 args: argparse.Namespace, *, sections: dict[str, Any] | None = None,
                 method: str | None = None) -> dict[str, Any]:
    """One scalar-uplink run; ``sections`` adds or replaces config tables (e.g. ``optimizer``, ``step``)."""
    config = config_from_dict({
        "mode": "scalar", "master_seed": args.seed,
        "rounds": {"min_devices": len(shards), "min_results": len(shards), "batch_size": args.batch_size,
                   "num_rounds": rounds, "deadline_s": 3600.0},
        "perturbation": {"k": k, "eps": args.eps},
        "optimizer": {"name": "sgd", "lr": args.lr},
        **(sections or {}),
    })
    start = time.perf_counter()
    curve, up = [], 0.0
    eval_every = max(1, rounds // args.points)
    for rec in emulate(bundle, config, data.train, shards, [EmulatedProfile()] * len(shards),
                       EmulationSettings(rounds=rounds, eval_every=eval_every, seed=args.seed), test=data.test):
        up += rec.bytes_up_per_device
        if rec.accuracy is not None:
            curve.append((rec.model_version, rec.accuracy, up))
    return {"method": method or f"scalar K={k}", "k": k, "curve": curve, "config": config.to_dict(),
            "bytes_up_per_device_round": up / rounds, "seconds": time.perf_counter() - start}


def backprop_curves(bundle: Bundle, data: SplitData, shards: list[np.ndarray], rounds: int,
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.baselines import fedavg_backprop

    epoch_steps = int(np.ceil(np.mean([s.size for s in shards]) / args.batch_size))
    variants = {  # name: (local_steps, optimizer, lr)
        "backprop fedsgd": (1, "sgd", args.lr),
        "backprop fedavg": (args.fedavg_epochs * epoch_steps, "adamw", 3e-3),
    }
    out = []
    for name, (steps, optimizer, lr) in variants.items():
        run = fedavg_backprop(bundle, data.train, data.test, shards, rounds, steps, lr, batch_size=args.batch_size,
                              optimizer=optimizer, seed=args.seed, eval_every=max(1, rounds // args.points))
        per = run.rounds[-1].bytes_up_per_device
        out.append({"method": name, "local_steps": steps, "optimizer": optimizer, "lr": lr,
                    "curve": [(r.round_id + 1, r.accuracy, per * (r.round_id + 1)) for r in run.rounds
                              if r.accuracy is not None],
                    "bytes_up_per_device_round": per, "seconds": run.seconds})
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        ds = result["datasets"][name]
        for run in ds["runs"]:
            if not run["curve"]:
                continue
            rounds, acc, up = zip(*run["curve"])
            style = "--" if run["method"].startswith("backprop") else "-"
            row[0].plot(rounds, [100 * a for a in acc], style, marker="o", ms=3, label=run["method"])
            row[1].plot(up, [100 * a for a in acc], style, marker="o", ms=3, label=run["method"])
        title = f"{name} {'-'.join(map(str, ds['layers']))} ({ds['parameters']:,} weights), {result['devices']} devices"
        row[0].set_title(title, fontsize=9)
        row[0].set_xlabel("round")
        row[1].set_xlabel("uplinked bytes per device (cumulative)")
        row[1].set_xscale("log")
        for ax in row:
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"devices": args.devices, "batch_size": args.batch_size, "eps": args.eps,
                              "server_lr": args.lr, "datasets": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = load_split(DatasetConfig(name=DATASET[name], max_train=args.train_limit, seed=args.seed))
            assert data.train.features is not None and data.train.labels is not None
            sizes = (int(data.train.features.shape[1]), *(int(h) for h in args.hidden.split(",") if h), 10)
            bundle = load_bundle(export_mlp(MLPConfig(layer_sizes=sizes, seed=args.seed), Path(tmp) / name))
            shards = partition(data.train.labels, PartitionConfig("iid", args.devices, seed=args.seed))
            rounds = args.rounds if args.rounds else (100 if name == "digits" else 200)
            ks = args.ks if args.ks else ([16, 64, 256] if name == "digits" else [64])
            runs = backprop_curves(bundle, data, shards, rounds, args)
            for k in ks:
                runs.append(scalar_curve(bundle, data, shards, k, rounds, args))
            for r in runs:
                _say(args, name, r)
            result["datasets"][name] = {"layers": list(sizes), "parameters": bundle.manifest.num_trainable,
                                        "train": int(data.train.labels.size), "rounds": rounds, "runs": runs}
    result["seconds"] = time.perf_counter() - start
    return result


def _say(args: argparse.Namespace, name: str, r: dict[str, Any]) -> None:
    if args.json:
        return
    at20 = next((a for rnd, a, _ in r["curve"] if rnd == 20), None)
    last = r["curve"][-1]
    print(f"{name:<8} {r['method']:<16} round 20 {'' if at20 is None else f'{100 * at20:5.2f}%':>6}  "
          f"round {last[0]:>3} {100 * last[1]:5.2f}%  up/device/round {r['bytes_up_per_device_round']:9.0f} B  "
          f"{r['seconds']:6.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(DATASET), default=["digits", "fashion"])
    p.add_argument("--train-limit", type=int, default=20_000, help="training samples, 0 = all (default 20000)")
    p.add_argument("--hidden", default="32", help="hidden widths (default: %(default)s)")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=0, help="0: 100 for digits, 200 for fashion")
    p.add_argument("--ks", type=int, nargs="*", default=None,
                   help="perturbations per device-round (default: 16 64 256 on digits, 64 on fashion)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=0.5, help="server SGD learning rate (default: %(default)s)")
    p.add_argument("--fedavg-epochs", type=int, default=2, help="local Adam epochs of the FedAvg baseline")
    p.add_argument("--points", type=int, default=10, help="evaluations per run (plus round 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for baffle.json and baffle.png")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "baffle.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out / "baffle.png")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"total {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
