"""Fashion-MNIST 784-32-10 with scalar uplink: which server-side mechanism closes the gap to backprop.

The fleet and model of ``docs/results/baffle.md`` (10 IID devices, every weight of the tanh MLP
trainable, 20,000 training images, all 10,000 test images, minibatch 64, eps 1e-3, central
differences, Rademacher probes, 200 rounds). Every run goes through the in-process fleet
emulation against the real aggregator in ``scalar`` mode (:func:`benchmarks.baffle.scalar_curve`);
only the aggregator's config differs between runs:

* ``k``: probes per device per round (the round's budget is 10 x k);
* ``opt`` / ``lr``: the server optimizer (``sgd``, ``momentum``, ``adam``) and its rate;
* ``norm=std``: FZOO's step normalised by the spread of the round's d_k (``[step] normalize``);
* ``dim=r``: the probe-budget scale ``P / (P + r)`` (``[step] probe_scaling = "budget"``);
* ``mode=trajectory steps=S llr=r``: the ``trajectory`` upload mode instead of ``scalar`` (S local
  steps of ``k`` probes at local rate ``r`` per device, S x k scalars up, replayed by the server);
* ``init=head``: before round 0, the output layer is fitted on the frozen random hidden features
  by the forward-only nearest-centroid initialisation of :mod:`fleet.probe_init` (class means and
  a temperature, two small uploads per device); hidden features are computed here with numpy
  from the bundle's own weights (the forward a device runs).

References on the same axes: FedAvg-backprop and FedSGD-backprop on the bundle's torch twin
(:func:`benchmarks.baselines.fedavg_backprop`, from the same Glorot initial weights), and the
linear-probe floor (multinomial logistic regression on the frozen random hidden features, i.e.
the best any head-only training could do).

A run is written as ``--run "NAME k=16 opt=sgd lr=0.5 norm=std dim=2000 init=head"``; ``--set``
names the lists of :data:`RUN_SETS` (the ablation of ``docs/results/baffle.md``). Results are
merged into ``--json`` after every run (keyed by label and seed), so an interrupted sweep keeps
what finished::

    nice python benchmarks/zo_fashion.py --set k16 --seeds 0 1 2 --references --json docs/results/zo_fashion_k16.json
    nice python benchmarks/zo_fashion.py --set budget k64 --seeds 0 1 2 --json docs/results/zo_fashion_budget.json
    nice python benchmarks/zo_fashion.py --set trajectory --seeds 0 1 2 --json docs/results/zo_fashion_trajectory.json
    python benchmarks/zo_fashion.py --plot docs/results/zo_fashion_*.json --out docs/results/zo_fashion.png
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
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baffle import scalar_curve
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.export.mlp import MLPConfig, export_mlp
from fwdfleet.fleet.datasets import DatasetConfig, SplitData, load_split
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.probe_init import probe_init

RUN_SETS: dict[str, tuple[str, ...]] = {
    # 160 probes a round (10 devices x K=16): every mechanism, every baseline lr-swept
    "k16": (
        "spsa-k16 k=16 opt=sgd lr=0.0625",
        "spsa-k16 k=16 opt=sgd lr=0.125",
        "spsa-k16 k=16 opt=sgd lr=0.25",
        "spsa-k16 k=16 opt=sgd lr=0.5",
        "spsa-mom-k16 k=16 opt=momentum lr=0.0125",
        "spsa-mom-k16 k=16 opt=momentum lr=0.025",
        "spsa-adam-k16 k=16 opt=adam lr=0.003",
        "norm-k16 k=16 opt=sgd norm=std lr=0.05",
        "norm-k16 k=16 opt=sgd norm=std lr=0.2",
        "norm-k16 k=16 opt=sgd norm=std lr=0.5",
        "normmom-k16 k=16 opt=momentum norm=std lr=0.01",
        "normmom-k16 k=16 opt=momentum norm=std lr=0.02",
        "normmom-k16 k=16 opt=momentum norm=std lr=0.05",
        "norm+head-k16 k=16 opt=sgd norm=std lr=0.1 init=head",
        "normmom+head-k16 k=16 opt=momentum norm=std lr=0.01 init=head",
        "normmom+head-k16 k=16 opt=momentum norm=std lr=0.02 init=head",
    ),
    # the probe budget: one lr for 10, 40 and 160 probes a round, against the lr tuned at 160
    # (0.2 x (160 + 25,450) / 160 = 32 with effective_dim = the 25,450 trainables)
    "budget": (
        "norm-k1 k=1 opt=sgd norm=std lr=0.2",
        "norm-k4 k=4 opt=sgd norm=std lr=0.2",
        "budget-k1 k=1 opt=sgd norm=std dim=25450 lr=32",
        "budget-k4 k=4 opt=sgd norm=std dim=25450 lr=32",
        "budget-k16 k=16 opt=sgd norm=std dim=25450 lr=32",
    ),
    # 640 probes a round: the BAFFLE page's K=64
    "k64": (
        "spsa-k64 k=64 opt=sgd lr=0.5",
        "norm-k64 k=64 opt=sgd norm=std lr=0.2",
    ),
    # upload mode 'trajectory': each device takes steps= local zeroth-order steps of k= probes at the
    # local rate llr= and uploads steps x k scalars; the server averages the replayed weights (sgd lr=1:
    # plain averaging). 8 x 4 = 32 pairs up per device and round (173 bytes), 320 probes a round.
    "trajectory": (
        "traj-s8k4 mode=trajectory steps=8 k=4 llr=0.05 opt=sgd lr=1.0",
        "traj-s8k4 mode=trajectory steps=8 k=4 llr=0.1 opt=sgd lr=1.0",
    ),
}


def parse_run(spec: str) -> dict[str, Any]:
    name, *items = spec.split()
    run: dict[str, Any] = {"name": name, "k": 16, "opt": "sgd", "lr": 0.5, "norm": "none", "dim": 0,
                           "init": "glorot", "momentum": 0.9, "mode": "scalar", "steps": 0, "llr": 0.0}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in run or key == "name":
            raise SystemExit(f"--run {spec!r}: {item!r} must be one of k=, opt=, lr=, norm=, dim=, init=, momentum=, "
                             "mode=, steps=, llr=")
        run[key] = type(run[key])(value)
    keys = ("k", "opt", "lr", "norm", "dim", "init") + (("mode", "steps", "llr") if run["mode"] != "scalar" else ())
    run["label"] = f"{name} " + " ".join(f"{k}={run[k]}" for k in keys)
    return run


def sections(run: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"optimizer": {"name": run["opt"], "lr": run["lr"]}}
    if run["opt"] == "momentum":
        out["optimizer"]["momentum"] = run["momentum"]
    step: dict[str, Any] = {}
    if run["norm"] != "none":
        step["normalize"] = run["norm"]
    if run["dim"]:
        step.update(probe_scaling="budget", effective_dim=run["dim"])
    if step:
        out["step"] = step
    if run["mode"] != "scalar":  # local-training modes: the round's local steps and rate
        out["mode"] = run["mode"]
        out["local"] = {"lr": run["llr"], "steps": run["steps"]}
    return out


def hidden(bundle_w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The one hidden layer's tanh features: the forward of ``export/mlp.py`` up to the head."""
    return np.tanh(x @ bundle_w["layers.0.weight"].T + bundle_w["layers.0.bias"]).astype(np.float32)


def head_init(bundle: Bundle, data: SplitData, shards: list[np.ndarray], out: Path) -> tuple[Bundle, dict[str, Any]]:
    w = bundle.load_trainables()
    assert data.train.features is not None and data.train.labels is not None
    feats = [(hidden(w, data.train.features[s]), data.train.labels[s]) for s in shards]
    fit = probe_init(feats, int(w["layers.1.bias"].size))
    new = dict(w, **{"layers.1.weight": fit.weight, "layers.1.bias": fit.bias})
    return bundle.save_as(out, new), {"scale": fit.scale, "bytes_per_device": fit.bytes_per_device}


def accuracy(w: dict[str, np.ndarray], data: SplitData) -> float:
    assert data.test.features is not None and data.test.labels is not None
    logits = hidden(w, data.test.features) @ w["layers.1.weight"].T + w["layers.1.bias"]
    return float((logits.argmax(1) == data.test.labels).mean())


def linear_probe(bundle: Bundle, data: SplitData) -> float:
    from sklearn.linear_model import LogisticRegression

    w = bundle.load_trainables()
    assert data.train.features is not None and data.test.features is not None
    m = LogisticRegression(max_iter=2000).fit(hidden(w, data.train.features), data.train.labels)
    return float(m.score(hidden(w, data.test.features), data.test.labels))


def merged(paths: list[Path]) -> dict[str, Any]:
    doc: dict[str, Any] = {"runs": {}, "references": {}}
    for path in paths:
        part = json.loads(path.read_text())
        for section in doc:
            doc[section].update(part.get(section, {}))
    return doc


def _merge(path: Path | None, key: str, entry: Any) -> None:
    if path is None:
        return
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}, "references": {}}
    section, _, name = key.partition("/")
    doc[section][name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=None, help="a run spec (repeatable)")
    p.add_argument("--set", nargs="*", choices=list(RUN_SETS), default=None,
                   help="named lists of runs (default: all, unless --run is given)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--train-limit", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--points", type=int, default=10, help="evaluations per run (plus round 20)")
    p.add_argument("--references", action="store_true",
                   help="also run FedSGD/FedAvg-backprop and the linear probe per seed")
    p.add_argument("--fedavg-epochs", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="merge results into this file")
    p.add_argument("--fedavg", action=argparse.BooleanOptionalAction, default=True,
                   help="include FedAvg-backprop in --references (the slowest reference)")
    p.add_argument("--plot", type=Path, nargs="+", default=None,
                   help="plot these results files (merged) instead of running")
    p.add_argument("--out", type=Path, default=None, help="figure path for --plot")
    p.add_argument("--names", nargs="*", default=None, help="--plot only these run names (first word of a label)")
    args = p.parse_args(argv)
    if args.plot is not None:
        doc = merged(args.plot)
        plot(doc, args.out or args.plot[0].with_suffix(".png"), args.names)
        print(table(doc))
        return 0
    specs = list(args.run or [])
    for name in args.set if args.set is not None else ([] if specs else list(RUN_SETS)):
        specs += RUN_SETS[name]
    runs = [parse_run(s) for s in specs]
    for seed in args.seeds:
        data = load_split(DatasetConfig(name="fashion-mnist", max_train=args.train_limit, seed=seed))
        assert data.train.labels is not None
        shards = partition(data.train.labels, PartitionConfig("iid", args.devices, seed=seed))
        with tempfile.TemporaryDirectory() as tmp:
            bundle = load_bundle(export_mlp(MLPConfig(layer_sizes=(784, 32, 10), seed=seed), Path(tmp) / "mlp"))
            headed, head_info = head_init(bundle, data, shards, Path(tmp) / "headed")
            ns = argparse.Namespace(seed=seed, batch_size=args.batch_size, eps=args.eps, lr=0.5, points=args.points)
            if args.references:
                refs = reference_runs(bundle, data, shards, args, seed)
                refs["head_init"] = {"accuracy": accuracy(headed.load_trainables(), data), **head_info}
                refs["glorot_init"] = {"accuracy": accuracy(bundle.load_trainables(), data)}
                for name, entry in refs.items():
                    _merge(args.json, f"references/{name} seed={seed}", entry)
                    print(f"seed {seed} {name}: {_summary(entry)}", flush=True)
            for run in runs:
                b = headed if run["init"] == "head" else bundle
                res = scalar_curve(b, data, shards, run["k"], args.rounds, ns, sections=sections(run),
                                   method=run["label"])
                res.update(run=run, seed=seed)
                _merge(args.json, f"runs/{run['label']} seed={seed}", res)
                print(f"seed {seed} {run['label']:<60} {_summary(res)}", flush=True)
    return 0


def reference_runs(bundle: Bundle, data: SplitData, shards: list[np.ndarray], args: argparse.Namespace,
                   seed: int) -> dict[str, Any]:
    from benchmarks.baselines import fedavg_backprop

    out: dict[str, Any] = {}
    t = time.perf_counter()
    out["linear_probe"] = {"accuracy": linear_probe(bundle, data), "seconds": time.perf_counter() - t}
    epoch_steps = int(np.ceil(np.mean([s.size for s in shards]) / args.batch_size))
    variants = {"backprop fedsgd": (1, "sgd", 0.5)}
    if args.fedavg:
        variants["backprop fedavg"] = (args.fedavg_epochs * epoch_steps, "adamw", 3e-3)
    for name, (steps, opt, lr) in variants.items():
        run = fedavg_backprop(bundle, data.train, data.test, shards, args.rounds, steps, lr,
                              batch_size=args.batch_size, optimizer=opt, seed=seed,
                              eval_every=max(1, args.rounds // args.points))
        out[name] = {"curve": [(r.round_id + 1, r.accuracy) for r in run.rounds if r.accuracy is not None],
                     "seconds": run.seconds, "local_steps": steps, "optimizer": opt, "lr": lr}
    for opt, lr in EXACT_SWEEP:
        out[f"exact-gradient {opt} lr={lr}"] = exact_gradient_run(bundle, data, shards, args, seed, opt, lr)
    return out


# server optimizers and rates for the exact-gradient single-step runs (the best is the ceiling)
EXACT_SWEEP = (("sgd", 0.5), ("momentum", 0.1), ("momentum", 0.3), ("adam", 0.003), ("adam", 0.01))


def exact_gradient_run(bundle: Bundle, data: SplitData, shards: list[np.ndarray], args: argparse.Namespace,
                       seed: int, opt: str, lr: float) -> dict[str, Any]:
    """One server step per round from the exact gradient of the round's minibatches (each device 64
    samples of its shard): what a scalar round estimates, with the noise of the estimate removed.
    No number of probes per round can do better than the best of these with one step per round."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    w0 = bundle.load_trainables()
    names = ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias")
    w = [torch.tensor(w0[k]).clone().requires_grad_() for k in names]
    optim = {"sgd": lambda: torch.optim.SGD(w, lr=lr), "momentum": lambda: torch.optim.SGD(w, lr=lr, momentum=0.9),
             "adam": lambda: torch.optim.Adam(w, lr=lr)}[opt]()
    assert data.train.features is not None and data.train.labels is not None
    x, y = torch.tensor(data.train.features), torch.tensor(data.train.labels).long()
    rng = np.random.default_rng(seed)
    every = max(1, args.rounds // args.points)
    curve = []
    for r in range(args.rounds):
        idx = torch.tensor(np.concatenate([rng.choice(s, size=min(args.batch_size, s.size), replace=False)
                                           for s in shards]))
        logits = torch.tanh(x[idx] @ w[0].T + w[1]) @ w[2].T + w[3]
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
        if (r + 1) % every == 0 or r + 1 in (20, args.rounds):
            curve.append((r + 1, accuracy({k: v.detach().numpy() for k, v in zip(names, w)}, data)))
    return {"curve": curve, "seconds": time.perf_counter() - start, "optimizer": opt, "lr": lr}


def _summary(entry: dict[str, Any]) -> str:
    if "curve" in entry:
        pts = {int(c[0]): c[1] for c in entry["curve"]}
        at20 = pts.get(20)
        last = max(pts)
        s = f"round 20 {100 * at20:5.2f}%  " if at20 is not None else ""
        return f"{s}round {last} {100 * pts[last]:5.2f}%  {entry.get('seconds', 0):6.1f} s"
    return f"{100 * entry['accuracy']:5.2f}%"


def _mean_curve(curves: list[list[Any]]) -> tuple[list[int], np.ndarray]:
    rounds = sorted({int(c[0]) for curve in curves for c in curve})
    per = np.array([[dict((int(c[0]), c[1]) for c in curve).get(r, np.nan) for r in rounds] for curve in curves])
    return rounds, 100 * per


def best_by_name(doc: dict[str, Any]) -> dict[str, tuple[str, list[list[Any]]]]:
    """Per run name (the first word of a label), the label with the best mean final accuracy."""
    groups: dict[str, list[list[Any]]] = {}
    for entry in doc["runs"].values():
        groups.setdefault(entry["method"], []).append(entry["curve"])
    best: dict[str, tuple[str, list[list[Any]], float]] = {}
    for label, curves in groups.items():
        final = float(np.mean([curve[-1][1] for curve in curves]))
        name = label.split()[0]
        if name not in best or final > best[name][2]:
            best[name] = (label, curves, final)
    return {k: (v[0], v[1]) for k, v in best.items()}


def table(doc: dict[str, Any], rounds: tuple[int, ...] = (20, 100, 200)) -> str:
    """Markdown: per label and reference, mean [min, max] accuracy over seeds at ``rounds``."""
    rows: dict[str, list[list[Any]]] = {}
    for entry in doc["runs"].values():
        rows.setdefault(entry["method"], []).append(entry["curve"])
    for key, entry in doc["references"].items():
        if "curve" in entry:
            rows.setdefault(key.rsplit(" seed=", 1)[0], []).append(entry["curve"])
    lines = ["| run | seeds | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in rounds) + " |"]
    for label, curves in rows.items():
        cells = []
        for r in rounds:
            vals = [100 * dict((int(c[0]), c[1]) for c in curve)[r] for curve in curves
                    if r in {int(c[0]) for c in curve}]
            cells.append(f"{np.mean(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]" if vals else "")
        lines.append(f"| {label} | {len(curves)} | " + " | ".join(cells) + " |")
    points: dict[str, list[float]] = {}
    for key, entry in doc["references"].items():
        if "accuracy" in entry:
            points.setdefault(key.rsplit(" seed=", 1)[0], []).append(100 * entry["accuracy"])
    for name, vals in points.items():
        lines.append(f"| {name} | {len(vals)} | {np.mean(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}] | | |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path, names: list[str] | None = None) -> None:
    """Each run name's best setting (mean over seeds, band = seed range), with the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs: dict[str, list[Any]] = {}
    for key, entry in doc["references"].items():
        refs.setdefault(key.rsplit(" seed=", 1)[0], []).append(entry)
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, (label, curves) in sorted(best_by_name(doc).items()):
        if names is not None and name not in names:
            continue
        rounds, per = _mean_curve(curves)
        line, = ax.plot(rounds, np.nanmean(per, 0), marker="o", ms=3, label=f"{label} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(rounds, np.nanmin(per, 0), np.nanmax(per, 0), color=line.get_color(), alpha=0.15)
    exact = {k: v for k, v in refs.items() if k.startswith("exact-gradient")}
    if exact:
        name = max(exact, key=lambda k: np.mean([e["curve"][-1][1] for e in exact[k]]))
        rounds, per = _mean_curve([e["curve"] for e in exact[name]])
        ax.plot(rounds, np.nanmean(per, 0), "-.", color="gray",
                label=f"{name}: best exact-gradient step per round ({len(exact[name])} seeds)")
    for name, entries in sorted(refs.items()):
        if name in exact:
            continue
        if "curve" in entries[0]:
            rounds, per = _mean_curve([e["curve"] for e in entries])
            ax.plot(rounds, np.nanmean(per, 0), "--", color="black" if "fedavg" in name else "tab:gray",
                    label=f"{name} ({len(entries)} seeds)")
        else:
            acc = 100 * float(np.mean([e["accuracy"] for e in entries]))
            text = {"linear_probe": "linear-probe floor (frozen random hidden layer)",
                    "head_init": "forward-only head init (round 0)", "glorot_init": "Glorot init (round 0)"}
            ax.axhline(acc, ls=":", color={"linear_probe": "tab:red", "head_init": "tab:brown"}.get(name, "tab:pink"),
                       label=f"{text.get(name, name)} {acc:.1f}%")
    ax.axhline(85.0, color="green", lw=0.8, alpha=0.6, label="target 85%")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST 784-32-10, 10 IID devices: scalar uplink vs backprop (mean over seeds, band = range)",
                 fontsize=9)
    ax.set_ylim(40, 90)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
