"""``fwdfleet pff run``: Pipeline Forward-Forward, layers trained in parallel by node processes.

The coordinator exports an FF-MLP bundle, serves the parameter store over gRPC and starts one
process per node (one compute thread each); nodes exchange layer parameters through the store.
``--mode sequential`` is the one-process baseline with the same code. See :mod:`pff`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fwdfleet.errors import ConfigError
from fwdfleet.lr_schedule import LR_SCHEDULES


def register(sub: Any) -> None:
    p = sub.add_parser("pff", help="Pipeline Forward-Forward: train FF layers in parallel across node processes",
                       description=__doc__)
    psub = p.add_subparsers(dest="pff_command", metavar="ACTION", required=True)
    r = psub.add_parser("run", help="run PFF training (or its sequential baseline) and report accuracy and timing",
                        description="Train a Forward-Forward MLP with Pipeline Forward-Forward (Aktemur et al.).")
    r.add_argument("--mode", choices=("sequential", "single-layer", "all-layers", "federated"), default="all-layers",
                   help="single-layer: node i owns layer i; all-layers: round-robin chapters; federated: "
                        "each node keeps its own data shard and every chapter of every layer is passed round "
                        "the nodes, each training it on its shard (default: %(default)s)")
    r.add_argument("--nodes", type=int, default=2, help="node processes (sequential: 1) (default: %(default)s)")
    r.add_argument("--layers", default=None,
                   help="input width then layer widths, comma-separated (default: 784,500,500,500 for "
                        "fashion-mnist, 64,128,128 for digits)")
    r.add_argument("--epochs", type=int, default=10, help="total epochs E (default: %(default)s)")
    r.add_argument("--splits", type=int, default=10, help="chapters S (each E/S epochs) (default: %(default)s)")
    r.add_argument("--objective", choices=("hinton", "symmetric", "pon", "sff"), default="symmetric",
                   help="layer objective; pon = Performance-Optimized Network (softmax head per layer) "
                        "(default: %(default)s)")
    r.add_argument("--negatives", choices=("adaptive", "random", "fixed"), default="random",
                   help="AdaptiveNEG, RandomNEG (re-drawn each chapter) or FixedNEG (default: %(default)s)")
    r.add_argument("--negative-temperature", type=float, default=1.0,
                   help="adaptive: sample the wrong label from softmax(goodness / T); 0 = the most-predicted "
                        "wrong label (default: %(default)s)")
    r.add_argument("--ring-adam", choices=("hand-on", "restart"), default="hand-on",
                   help="federated: hand Adam's state on with the layer inside a chapter, or restart Adam at "
                        "each node (default: %(default)s)")
    r.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: %(default)s)")
    r.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="the learning rate per chapter: constant, or decaying from --lr towards 0 over the "
                        "chapters, the same in every mode (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    r.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits", help="(default: %(default)s)")
    r.add_argument("--max-train", type=int, default=0, help="use a seeded subset of N training examples (0: all)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workdir", default=None, help="keep the bundle, store and logs here (default: a temp folder)")
    r.add_argument("--timeline", default=None, metavar="PNG", help="write the timeline plot here")
    r.add_argument("--json", action="store_true", help="print the result (with the timeline) as JSON")
    r.set_defaults(func=_run)


def _layers(args: argparse.Namespace) -> tuple[int, ...]:
    text = args.layers or ("784,500,500,500" if args.dataset == "fashion-mnist" else "64,128,128")
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--layers must be comma-separated integers like 784,500,500, got {text!r}") from e


def _run(args: argparse.Namespace) -> int:
    from fwdfleet.pff.config import PFFConfig
    from fwdfleet.pff.run import run_pff

    nodes = 1 if args.mode == "sequential" else args.nodes
    config = PFFConfig(mode=args.mode, nodes=nodes, layers=_layers(args), epochs=args.epochs, splits=args.splits,
                       objective=args.objective, negatives=args.negatives,
                       negative_temperature=args.negative_temperature, lr=args.lr, batch_size=args.batch_size,
                       dataset=args.dataset, max_train=args.max_train, seed=args.seed, ring_adam=args.ring_adam,
                       lr_schedule=args.lr_schedule)
    result = run_pff(config, args.workdir, progress=not args.json)
    if args.timeline:
        from fwdfleet.pff.plot import plot_timeline

        plot_timeline(result.timeline, args.timeline, num_nodes=nodes, restarts=result.restarts,
                      title=f"PFF {args.mode}, {nodes} node(s), layers {','.join(map(str, config.layers))}, "
                            f"{args.epochs} epochs in {args.splits} chapters")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    acc = ", ".join(f"{k} {v:.4f}" for k, v in result.accuracy.items())
    print(f"pff {args.mode}: {nodes} node(s), training {result.train_seconds:.2f} s "
          f"(wall {result.wall_seconds:.1f} s); test accuracy: {acc}")
    for n in result.nodes:
        print(f"  node {n.node}: {n.tasks} tasks, busy {n.busy_seconds:.2f} s, waiting {n.wait_seconds:.2f} s, "
              f"idle {n.idle_seconds:.2f} s, restarts {n.restarts}")
    if args.timeline:
        print(f"timeline: {args.timeline}")
    return 0
