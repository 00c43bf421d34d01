"""Federated PFF's ring with Adam restarted at each hand-off or handed on, in-process.

Federated PFF passes each chapter of a layer round the nodes' shards (``pff.schedule``). With
``PFFConfig.ring_adam = "restart"`` each node starts Adam afresh, so a layer's optimizer restarts
``N`` times per chapter instead of once; with ``"hand-on"`` (the default) a hand-off inside a
chapter carries Adam's state to the next node (``pff.chapter.with_adam_state``). This
runs the same tasks in one process, in the schedule's dependency order (no node processes; the
parameters are exactly what the nodes compute, every random choice deriving from the task), three
ways at each seed: sequential FF, the ring with Adam restarted, and the ring with Adam's state
handed on from part to part within a chapter (restarted at each chapter, as sequential FF does); the
node processes compute the same parameters in either setting (``tests/test_pff.py``).
It prints test accuracy and each ring's difference to sequential in points, paired by seed.

    OPENBLAS_NUM_THREADS=1 python benchmarks/pff_ring_adam.py --max-train 0 --epochs 20 --splits 20 \\
        --seeds 0 1 2 [--ring-adam hand-on restart] [--lr-schedule constant|linear|cosine] [--curve] [--json]

``--ring-adam`` picks the ring variants (default both); ``--lr-schedule`` decays Adam's learning
rate over the chapters, the same way in every variant (``PFFConfig.lr_schedule``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.device_runtime.ff_train import AdamState, evaluate_ff
from fwdfleet.lr_schedule import LR_SCHEDULES
from fwdfleet.pff.chapter import ActivationCache, Params, continues_adam, train_chapter
from fwdfleet.pff.config import RING_ADAM, PFFConfig, load_data, shard
from fwdfleet.pff.evaluate import evaluate
from fwdfleet.pff.run import export_network

SEQUENTIAL = "sequential"
RING = {"restart": "ring, Adam restarted at each hand-off", "hand-on": "ring, Adam handed on within a chapter"}
VARIANTS = (SEQUENTIAL, *RING.values())


def run(config: PFFConfig, bundle: Path, curve: list[float] | None = None) -> dict[str, float]:
    """Train ``config``'s schedule in this process (federated: Adam as ``config.ring_adam`` says); test accuracy
    of the final network. With ``curve`` (a list), the goodness test accuracy after each chapter is appended."""
    network = load_bundle(bundle)
    layout, initial = FFLayout.from_manifest(network.manifest), network.load_trainables()
    schedule = config.schedule()
    train, test = load_data(config)
    shards = [shard(train, schedule.data_shard(p), schedule.num_shards, config.seed) for p in range(schedule.parts)]
    caches = [ActivationCache() for _ in range(schedule.parts)]
    versions: dict[tuple[int, int], Params] = {
        (i, 0): {name: initial[name] for name in layout.param_names(i).values()} for i in range(layout.num_layers)}
    states: dict[int, AdamState] = {}

    def network_at(version: int) -> dict[str, Any]:
        return {name: value for i in range(layout.num_layers) for name, value in versions[(i, version)].items()}

    for task in schedule.tasks():
        lower = {j: versions[(j, task.lower_version)] for j in range(task.layer)}
        state = states.get(task.layer) if continues_adam(task, config.ring_adam) else None
        result = train_chapter(layout, task, lower, versions[(task.layer, task.version_in)], shards[task.part],
                               config.train_config(task.chapter), schedule.chapter_epochs, cache=caches[task.part],
                               state=state)
        versions[(task.layer, task.version_out)] = result.params
        states[task.layer] = result.state
        if curve is not None and (task.layer, task.part) == (layout.num_layers - 1, task.parts - 1):  # chapter done
            predict = "goodness" if layout.heads == "none" else "head"
            curve.append(round(evaluate_ff(layout, network_at(task.lower_version), test.x, test.y, predict=predict,
                                           score_layers="all_but_first").accuracy, 4))
    return evaluate(layout, network_at(schedule.final_version), train, test, seed=config.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=("digits", "fashion-mnist"))
    p.add_argument("--layers", default="784,400,400,400,400")
    p.add_argument("--max-train", type=int, default=6000, help="training examples (0: all)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--nodes", type=int, default=2, help="ring length (shards)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ring-adam", nargs="+", choices=RING_ADAM, default=["restart", "hand-on"],
                   help="the ring variants to run beside sequential FF (default: both)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="(default: %(default)s)")
    p.add_argument("--curve", action="store_true",
                   help="also record each variant's test accuracy (goodness) after every chapter")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = []
    t0 = time.time()
    for seed in a.seeds:
        base = dict(dataset=a.dataset, layers=tuple(int(v) for v in a.layers.split(",")), max_train=a.max_train,
                    epochs=a.epochs, splits=a.splits, seed=seed, lr_schedule=a.lr_schedule)
        with tempfile.TemporaryDirectory() as tmp:
            configs = {SEQUENTIAL: PFFConfig(mode="sequential", nodes=1, **base)}  # type: ignore[arg-type]
            for ring_adam in a.ring_adam:
                configs[RING[ring_adam]] = PFFConfig(mode="federated", nodes=a.nodes, ring_adam=ring_adam, **base)  # type: ignore[arg-type]
            bundle = export_network(configs[SEQUENTIAL], Path(tmp) / "bundle")
            curves: dict[str, list[float]] = {v: [] for v in configs}
            acc = {v: run(c, bundle, curves[v] if a.curve else None) for v, c in configs.items()}
        key = "goodness" if "goodness" in acc[SEQUENTIAL] else "head"
        row = {"seed": seed, "prediction": key, **{v: round(acc[v][key], 4) for v in acc}}
        for v in acc:
            if v != SEQUENTIAL:
                row[f"{v}: points"] = round(100 * (acc[v][key] - acc[SEQUENTIAL][key]), 2)
        if a.curve:
            row.update({f"{v}: curve": curves[v] for v in configs})
        rows.append(row)
        if not a.json:
            print(json.dumps(row), flush=True)
    out = {"config": vars(a), "rows": rows, "seconds": round(time.time() - t0, 1)}
    if a.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
