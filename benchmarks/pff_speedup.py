"""Pipeline Forward-Forward: accuracy of each mode against sequential FF, speedup of 2 nodes, projection.

For each dataset (scikit-learn digits; Fashion-MNIST when ``/usr/share/datasets/fashion-mnist``
exists) this runs, one after the other in one invocation, the same network for the same epochs
and chapters in every mode: ``sequential`` (one node process), then ``single-layer``,
``all-layers`` and ``federated`` with ``--nodes`` node processes. Every node process and the
sequential one are held to one compute thread (``OPENBLAS_NUM_THREADS=1``; numpy layers, no
onnxruntime session is used in training). It reports:

* test accuracy (Goodness over all layers but the first, and the Softmax classifier) and its
  difference from sequential FF; also the device runtime's classic per-batch FF
  (``train_ff``, every layer stepped on every batch) at the same epochs, for reference;
* speedup = sequential training span / the mode's training span (first task start to last task
  end; process start-up is excluded and reported separately as wall time), each node's busy,
  waiting and idle seconds;
* a projection to 4 and 8 nodes: all-layers and single-layer PFF simulated
  (``pff.schedule.simulate``) with the per-layer training and input times measured in the
  sequential run plus its per-task overhead (publish, bookkeeping), at S and 4 S chapters.
  With S chapters and L layers no schedule beats ``L S / (S + L - 1)`` (a chapter of a layer
  needs the previous chapter of the same layer and this chapter of the layer below), and the
  slowest layer sets the pace of the pipeline.

    python benchmarks/pff_speedup.py            # digits + Fashion-MNIST (if present), ~4 minutes on 2 cores
    python benchmarks/pff_speedup.py --datasets digits --json

The machine's load average is printed with the results: other work on the cores skews speedups.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: this process evaluates and runs train_ff

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.device_runtime.ff_objectives import NEGATIVES
from fwdfleet.device_runtime.ff_train import evaluate_ff, train_ff
from fwdfleet.export.ff_mlp import FFMLPConfig, initial_trainables
from fwdfleet.fleet.datasets import FASHION_DIR
from fwdfleet.pff.config import RING_ADAM, PFFConfig, load_data
from fwdfleet.pff.run import PFFResult, TimelineRow, run_pff
from fwdfleet.pff.schedule import Schedule, Task, makespan, simulate

MODES = ("single-layer", "all-layers", "federated")
DEFAULTS: dict[str, tuple[tuple[int, ...], int, int, int]] = {  # dataset -> (layers, max_train, epochs, splits)
    "digits": ((64, 256, 256, 256, 256), 0, 20, 10),
    "fashion-mnist": ((784, 400, 400, 400, 400), 6000, 10, 10),
}


def classic_ff(config: PFFConfig) -> float:
    """The device runtime's per-batch FF (every layer stepped on every batch), same epochs: test accuracy."""
    train, test = load_data(config)
    cfg = FFMLPConfig(layers=config.layers, num_classes=10, heads=config.head, seed=config.seed)  # type: ignore[arg-type]
    layout = FFLayout(sizes=config.layers, num_classes=10, heads=cfg.heads)
    tc = config.train_config()
    from dataclasses import replace

    result = train_ff(layout, train.x, train.y, replace(tc, epochs=config.epochs), trainables=initial_trainables(cfg))
    predict = "goodness" if layout.heads == "none" else "head"
    return evaluate_ff(layout, result.trainables, test.x, test.y, predict=predict,  # type: ignore[arg-type]
                       score_layers="all_but_first").accuracy


def task_overhead(rows: list[TimelineRow]) -> float:
    """Median gap between consecutive tasks of the sequential run (publish, progress reports, bookkeeping)."""
    mine = sorted(rows, key=lambda r: r.start)
    gaps = [b.start - a.end - b.wait_seconds for a, b in itertools.pairwise(mine)]
    return max(0.0, statistics.median(gaps)) if gaps else 0.0


def task_slowdown(seq: list[TimelineRow], rows: list[TimelineRow]) -> dict[str, float] | None:
    """Median ratio of a task's training and input seconds to the same (layer, chapter) task's in the sequential
    run (first repetition): how much slower the same computation ran with the nodes side by side. None for
    federated PFF, whose tasks (a node's part of a ring) are not the sequential run's."""
    base = {(r.layer, r.chapter): r for r in seq}
    if len(rows) != len(base) or any((r.layer, r.chapter) not in base for r in rows):
        return None
    train = [r.train_seconds / base[(r.layer, r.chapter)].train_seconds for r in rows]
    inputs = [r.input_seconds / base[(r.layer, r.chapter)].input_seconds for r in rows
              if base[(r.layer, r.chapter)].input_seconds > 1e-3]
    return {"train": round(statistics.median(train), 3),
            "input": round(statistics.median(inputs), 3) if inputs else 1.0}


def project(seq: PFFResult, overhead: float, layers: int, epochs: int, splits: int,
            nodes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Simulated speedups from the sequential run's per-layer times, scaled to other chapter counts.

    A task of layer ``l`` costs its measured training time (per epoch, times the chapter's epochs), the
    forward passes that make its input (one layer when the node trained the layer below in the same
    chapter, as in all-layers; every layer below in single-layer) and the per-task overhead. A federated
    task (one node's part of a chapter's ring) costs 1/N of its all-layers task plus the overhead.
    """
    rows = seq.timeline
    train_epoch = {la: statistics.median(r.train_seconds for r in rows if r.layer == la) * splits / epochs
                   for la in range(layers)}
    fwd = {la: statistics.median(r.input_seconds for r in rows if r.layer == la + 1) for la in range(layers - 1)}
    out = []
    for s in sorted({splits, 4 * splits}):
        def all_layers(t: Task, s: int = s) -> float:
            return train_epoch[t.layer] * epochs / s + (fwd[t.layer - 1] if t.layer else 0.0) + overhead

        def single_layer(t: Task, s: int = s) -> float:
            return train_epoch[t.layer] * epochs / s + sum(fwd[j] for j in range(t.layer)) + overhead

        base = makespan(simulate(Schedule("sequential", layers, 1, s, s), all_layers))
        for n in nodes:
            span = makespan(simulate(Schedule("all-layers", layers, n, s, s), all_layers))
            out.append({"mode": "all-layers", "nodes": n, "splits": s, "speedup": round(base / span, 3),
                        "bound": round(min(n, layers * s / (s + layers - 1)), 3)})
            def federated(t: Task, s: int = s) -> float:
                return (all_layers(t, s) - overhead) / t.parts + overhead

            span = makespan(simulate(Schedule("federated", layers, n, s, s), federated))
            out.append({"mode": "federated", "nodes": n, "splits": s, "speedup": round(base / span, 3),
                        "bound": None})  # no simple closed form for the rings
            if n <= layers:
                span = makespan(simulate(Schedule("single-layer", layers, n, s, s), single_layer))
                out.append({"mode": "single-layer", "nodes": n, "splits": s, "speedup": round(base / span, 3),
                            "bound": round(min(n, layers * s / (s + layers - 1)), 3)})
    return out


def bench_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    layers, max_train, epochs, splits = DEFAULTS[dataset]
    if args.layers:
        layers = tuple(int(x) for x in args.layers.split(","))
    epochs, splits = args.epochs or epochs, args.splits or splits
    base = dict(layers=layers, dataset=dataset, epochs=epochs, splits=splits, objective=args.objective,
                negatives=args.negatives, max_train=args.max_train if args.max_train is not None else max_train,
                seed=args.seed, ring_adam=args.ring_adam)
    runs: dict[str, PFFResult] = {}
    spans: dict[str, list[float]] = {mode: [] for mode in ("sequential", *args.modes)}
    for rep in range(args.repeats):
        for mode in spans:
            cfg = PFFConfig(mode=mode, nodes=1 if mode == "sequential" else args.nodes, **base)  # type: ignore
            r = run_pff(cfg)
            spans[mode].append(r.train_seconds)
            if rep == 0:
                runs[mode] = r
            elif r.accuracy != runs[mode].accuracy:
                raise RuntimeError(f"{mode}: repetition {rep} gave {r.accuracy}, the first {runs[mode].accuracy}")
            if not args.json:
                print(f"  {dataset} {mode:<13} acc {r.accuracy}  training {r.train_seconds:.2f} s", file=sys.stderr,
                      flush=True)
    for mode, r in runs.items():
        if args.timelines:
            from fwdfleet.pff.plot import plot_timeline

            out = Path(args.timelines) / f"pff_{dataset}_{mode}.png"
            plot_timeline(r.timeline, out, num_nodes=r.config.nodes,
                          title=f"{dataset}: {mode}, {r.config.nodes} node(s)")
    seq = runs["sequential"]
    key = "goodness" if "goodness" in seq.accuracy else "head"
    rows = []
    for mode, r in runs.items():
        rows.append({
            "mode": mode, "nodes": r.config.nodes,
            "accuracy": r.accuracy[key], "softmax_accuracy": r.accuracy["softmax"],
            "delta_points": round(100 * (r.accuracy[key] - seq.accuracy[key]), 2),
            "softmax_delta_points": round(100 * (r.accuracy["softmax"] - seq.accuracy["softmax"]), 2),
            "train_seconds": round(statistics.median(spans[mode]), 3), "wall_seconds": round(r.wall_seconds, 2),
            # one speedup per repetition (this mode against the sequential run of the same repetition)
            "speedups": [round(a / b, 3) for a, b in zip(spans["sequential"], spans[mode])],
            "speedup": round(statistics.median(a / b for a, b in zip(spans["sequential"], spans[mode])), 3),
            "nodes_detail": [{"node": n.node, "busy": n.busy_seconds, "wait": n.wait_seconds, "idle": n.idle_seconds}
                             for n in r.nodes],
            "task_slowdown": task_slowdown(seq.timeline, r.timeline) if mode != "sequential" else None,
        })
    seeds = paired_seeds(base, args) if args.seeds > 1 else None
    overhead = task_overhead(seq.timeline)
    classic = classic_ff(seq.config) if not args.skip_classic else None
    return {"dataset": dataset, "layers": list(layers), "epochs": epochs, "splits": splits,
            "train_examples": int(load_data(seq.config)[0].y.size), "prediction": key, "rows": rows,
            "classic_ff_accuracy": None if classic is None else round(classic, 4),
            "task_overhead_seconds": round(overhead, 4), "federated_seeds": seeds,
            "projection": project(seq, overhead, len(layers) - 1, epochs, splits, (2, 4, 8))}


def paired_seeds(base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Federated minus sequential accuracy at the ``--seeds - 1`` seeds after ``--seed`` (paired: the same data
    and initial network for both), to tell the ring's effect from seed-to-seed noise (the other modes
    compute exactly what sequential computes, so only federated needs this)."""
    key: str | None = None
    deltas: list[dict[str, Any]] = []
    for seed in range(args.seed + 1, args.seed + args.seeds):
        acc = {}
        for mode in ("sequential", "federated"):
            cfg = PFFConfig(mode=mode, nodes=1 if mode == "sequential" else args.nodes,
                            **{**base, "seed": seed})
            acc[mode] = run_pff(cfg).accuracy
        key = "goodness" if "goodness" in acc["sequential"] else "head"
        deltas.append({"seed": seed, "sequential": acc["sequential"][key], "federated": acc["federated"][key],
                       "delta_points": round(100 * (acc["federated"][key] - acc["sequential"][key]), 2)})
    return {"prediction": key, "runs": deltas}


def print_table(result: dict[str, Any]) -> None:
    for d in result["datasets"]:
        print(f"\n{d['dataset']}: layers {d['layers']}, {d['train_examples']} training examples, {d['epochs']} epochs "
              f"in {d['splits']} chapters; accuracy = {d['prediction']} (all layers but the first), softmax")
        print(f"{'mode':<13} {'nodes':>5} {'acc':>7} {'delta':>7} {'softmax':>8} {'delta':>7} {'train s':>8} "
              f"{'speedup':>8}  per node busy/wait/idle s")
        for r in d["rows"]:
            nodes = "  ".join(f"{n['busy']:.1f}/{n['wait']:.1f}/{n['idle']:.1f}" for n in r["nodes_detail"])
            print(f"{r['mode']:<13} {r['nodes']:>5} {r['accuracy']:>7.4f} {r['delta_points']:>+7.2f} "
                  f"{r['softmax_accuracy']:>8.4f} {r['softmax_delta_points']:>+7.2f} {r['train_seconds']:>8.2f} "
                  f"{r['speedup']:>7.2f}x  {nodes}")
        slow = [f"{r['mode']} x{r['task_slowdown']['train']:.2f} (inputs x{r['task_slowdown']['input']:.2f})"
                for r in d["rows"] if r.get("task_slowdown")]
        if slow:
            print("the same task's training time against the sequential run's, median: " + "; ".join(slow))
        if len(d["rows"][0]["speedups"]) > 1:
            print("speedup per repetition (median above): " + "; ".join(
                f"{r['mode']} " + ", ".join(f"{x:.2f}" for x in r["speedups"]) for r in d["rows"][1:]))
        if d.get("federated_seeds"):
            fs = d["federated_seeds"]["runs"]
            print("federated - sequential at other seeds (points): "
                  + ", ".join(f"seed {x['seed']}: {x['delta_points']:+.2f}" for x in fs))
        if d["classic_ff_accuracy"] is not None:
            print(f"classic per-batch FF (train_ff), same epochs: accuracy {d['classic_ff_accuracy']:.4f}")
        ms = d["task_overhead_seconds"] * 1000
        print(f"projection from the sequential run's per-layer times (+{ms:.1f} ms/task):")
        for p in d["projection"]:
            bound = "" if p["bound"] is None else f" (dependency bound {p['bound']:.2f}x)"
            print(f"  {p['mode']:<13} {p['nodes']} nodes, {p['splits']:>3} chapters: {p['speedup']:.2f}x{bound}")
    print(f"\nload average before/after: {result['load_before']} / {result['load_after']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(DEFAULTS), default=None,
                   help="default: digits, and fashion-mnist when its files exist")
    p.add_argument("--layers", default=None, help="override every dataset's layer widths (input first)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--splits", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None, help="training examples (0: all)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--objective", default="symmetric", choices=("hinton", "symmetric", "pon", "sff"))
    p.add_argument("--negatives", default="random", choices=NEGATIVES)
    p.add_argument("--ring-adam", default="hand-on", choices=RING_ADAM,
                   help="federated: Adam's state handed on inside a chapter, or restarted at each node")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="also run sequential and federated at K-1 more seeds (accuracy difference vs noise)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="default: all (sequential always runs)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every mode R times, in turn; speedup = median over the repetitions of the mode's "
                        "time against the same repetition's sequential time (these shared cores are noisy)")
    p.add_argument("--skip-classic", action="store_true", help="skip the per-batch train_ff reference")
    p.add_argument("--timelines", default=None, metavar="DIR", help="write each run's timeline plot here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    datasets = args.datasets or (["digits", "fashion-mnist"] if FASHION_DIR.is_dir() else ["digits"])
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.time()
    out = {"datasets": [bench_dataset(d, args) for d in datasets], "load_before": load_before,
           "load_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
           "seconds": round(time.time() - start, 1), "nodes": args.nodes, "objective": args.objective,
           "negatives": args.negatives}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
