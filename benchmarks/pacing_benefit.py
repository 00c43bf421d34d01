"""What variance-controlled pacing does to accuracy per uplinked byte and to time-to-accuracy.

The in-process fleet emulation (``fleet.emulate.emulate``: the real Coordinator, real
onnxruntime device steps, a simulated clock) trains the digits MLP of ``fwdfleet demo`` (20
devices, Dirichlet non-IID shards, the demo's phone/Pi profile mix, SGD lr 0.5) with

* pacing off at a fixed K of 4, 8 and 16 perturbations per device and round;
* pacing on (FwdLLM): start at K=4; after each round's results the Coordinator compares the
  noise ratio (squared relative standard error of the averaged estimate, see
  ``aggregator/pacing.py``) with a threshold, asks the devices for more perturbations while it
  is above, and adapts K for the next round.

The threshold is calibrated from the fixed-K runs, not guessed: ``K=<smallest> median`` uses the
median noise ratio the fixed run with the smallest K saw (pacing asks for more only when a round
is noisier than a typical round of that K), ``K=<largest> median`` the largest K's (every update
at least as reliable as a typical update of that K). ``--statistic`` picks the ratio
(``pacing.statistic``): ``halves`` (default) from the agreement of the even and odd devices'
estimates, about ``n / (K x devices)`` for n trainables, so it falls with K; ``spread``, the
older one, about ``x / (1 + x)`` with that x, which approaches 1 in the noise-dominated regime.
Both are logged for every run.

Every run gets the same uplink budget (what the fixed run with the largest K uploads in
``--rounds16`` rounds), so cheaper configurations run more rounds. ``--ks 16 32 64`` measures
pacing where it should matter, with many probes per round; targets near the final accuracy
(``--targets 0.9 0.93 0.95``) measure it late in training. Reported per run: accuracy against the
cumulative uplinked bytes (real protobuf sizes of all submissions, extra requests included) and
against the simulated fleet time (``RoundRecord.sim_time_s``: latency, transfers, measured compute
scaled by each profile, deadlines), the bytes and time to reach each target accuracy, K over
rounds. The fleet is steady by default (the presets' speeds and links, but no dropouts and
every device online): with the demo's dropouts and availability (``--realistic``) a round whose
selected device is gone waits for the 60 s deadline, and those waits, not compute or
communication, make up almost all of the simulated time. Simulated compute comes from the
device steps' measured wall time, so on a busy machine time figures carry some noise; byte
figures do not.

    python benchmarks/pacing_benefit.py                    # table + PNG (default out dir)
    python benchmarks/pacing_benefit.py --json --out DIR   # also a JSON summary on stdout
    python benchmarks/pacing_benefit.py --ks 16 32 64 --targets 0.9 0.93 0.95 --out DIR   # many probes, late
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fwdfleet.aggregator.config import config_from_dict  # noqa: E402
from fwdfleet.bundle import Bundle, load_bundle  # noqa: E402
from fwdfleet.fleet.datasets import DatasetConfig, SplitData, load_split  # noqa: E402
from fwdfleet.fleet.emulate import EmulationSettings, emulate  # noqa: E402
from fwdfleet.fleet.partition import PartitionConfig, partition  # noqa: E402
from fwdfleet.fleet.profiles import assign_profiles  # noqa: E402

DEVICES = 20
PROFILE_MIX = {"flagship-phone": 1.0, "budget-phone": 1.0, "raspberry-pi-4": 1.0}  # as fwdfleet demo
AGGREGATOR: dict[str, Any] = {  # fwdfleet demo's aggregator, K and pacing set per run
    "mode": "scalar",
    "rounds": {"fraction": 0.8, "over_selection": 1.25, "min_devices": 5, "min_available": 10, "min_results": 5,
               "deadline_s": 60.0, "batch_size": 32},
    "perturbation": {"k": 8, "eps": 0.01},
    "optimizer": {"name": "sgd", "lr": 0.5},
}


@dataclass
class Run:
    label: str
    k: int
    pacing: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def curve(self) -> dict[str, list[Any]]:
        up = 0
        pts: dict[str, list[Any]] = {"bytes": [], "sim_s": [], "accuracy": [], "k": [], "noise": [],
                                     "noise_spread": [], "extra": []}
        for r in self.rounds:
            up += r["bytes_up"]
            pts["k"].append(r["k"])
            pts["noise"].append(r["noise_ratio"])  # None: not measurable
            pts["noise_spread"].append(r.get("noise_ratio_spread"))  # None where the round record lacks it
            pts["extra"].append(r["extra_requests"])
            if r["accuracy"] is not None:
                pts["bytes"].append(up)
                pts["sim_s"].append(r["sim_time_s"])
                pts["accuracy"].append(r["accuracy"])
        return pts

    def first_reaching(self, target: float) -> dict[str, float] | None:
        c = self.curve()
        for b, s, a in zip(c["bytes"], c["sim_s"], c["accuracy"], strict=True):
            if a >= target:
                return {"bytes": b, "sim_s": s}
        return None


def export_bundle(folder: Path, data: SplitData, seed: int) -> Bundle:
    from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

    if data.train.features is None:
        raise ValueError("the digits data has no feature matrix")
    features = data.train.features.shape[1]
    sizes = (features, 32, data.num_classes)
    return load_bundle(export_mlp(MLPConfig(layer_sizes=sizes, labels=data.label_names, seed=seed), folder))


def run_one(run: Run, bundle: Bundle, data: SplitData, seed: int, byte_budget: float, max_rounds: int,
            realistic: bool) -> Run:
    cfg = json.loads(json.dumps(AGGREGATOR))
    cfg["perturbation"]["k"] = run.k
    cfg["pacing"] = run.pacing
    config = config_from_dict(cfg, source=run.label)
    assert data.train.labels is not None  # digits always has labels
    shards = partition(data.train.labels, PartitionConfig(scheme="dirichlet", num_devices=DEVICES, alpha=1.0,
                                                          seed=seed))
    profiles = assign_profiles(DEVICES, PROFILE_MIX, seed=seed)
    if not realistic:  # steady fleet: no round waits for a deadline
        profiles = [replace(p, dropout=0.0, availability=1.0) for p in profiles]
    settings = EmulationSettings(rounds=max_rounds, workers=1, eval_every=1, seed=seed)
    start, uploaded = time.perf_counter(), 0
    with closing(emulate(bundle, config, data.train, shards, profiles, settings, test=data.test)) as rounds:
        for rec in rounds:
            run.rounds.append(rec.to_json())
            uploaded += rec.bytes_up
            if uploaded >= byte_budget:
                break
    run.wall_s = time.perf_counter() - start
    return run


def noise_quantile(run: Run, q: float) -> float:
    vals = [r["noise_ratio"] for r in run.rounds if r["noise_ratio"] is not None]
    return float(np.quantile(vals, q)) if vals else math.nan


def summarize(runs: list[Run], targets: list[float]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        c = r.curve()
        best = max(c["accuracy"]) if c["accuracy"] else math.nan
        out.append({
            "label": r.label, "k_start": r.k, "pacing": r.pacing, "rounds": len(r.rounds),
            "uplink_bytes": c["bytes"][-1] if c["bytes"] else 0, "sim_s": c["sim_s"][-1] if c["sim_s"] else 0.0,
            "final_accuracy": c["accuracy"][-1] if c["accuracy"] else math.nan, "best_accuracy": best,
            "median_noise_ratio": noise_quantile(r, 0.5),
            "median_noise_ratio_spread": float(np.median([v for v in c["noise_spread"] if v is not None]
                                                         or [math.nan])),
            "mean_k": float(np.mean(c["k"])) if c["k"] else math.nan,
            "final_k": c["k"][-1] if c["k"] else None, "extra_requests": int(sum(c["extra"])),
            "bytes_per_device_round": float(np.mean([x["bytes_up_per_device"] for x in r.rounds])),
            "to_target": {str(t): r.first_reaching(t) for t in targets}, "wall_s": r.wall_s,
            "curve": c,
        })
    return out


def plot(runs: list[Run], targets: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in runs:
        c = r.curve()
        style = "-" if r.pacing.get("enabled") else "--"
        axes[0].plot(np.array(c["bytes"]) / 1e3, c["accuracy"], style, label=r.label)
        axes[1].plot(c["sim_s"], c["accuracy"], style, label=r.label)
        axes[2].plot(range(1, len(c["k"]) + 1), c["k"], style, label=r.label)
    for ax in axes[:2]:
        for t in targets:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
    axes[0].set_xlabel("uplinked kB (all devices, cumulative)")
    axes[1].set_xlabel("simulated fleet time (s)")
    axes[2].set_xlabel("applied round")
    axes[2].set_ylabel("K (perturbations per device)")
    axes[0].legend(fontsize=8)
    fig.suptitle("pacing vs fixed K: digits MLP, 20 emulated devices (dashed: fixed K, solid: pacing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds16", type=int, default=50,
                    help="rounds of the fixed run with the largest K: sets the byte budget")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16], help="fixed K runs (default: %(default)s)")
    ap.add_argument("--statistic", choices=["halves", "spread"], default="halves", help="pacing.statistic")
    ap.add_argument("--max-rounds", type=int, default=400)
    ap.add_argument("--targets", type=float, nargs="*", default=[0.7, 0.8, 0.85])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k-max", type=int, default=64)
    ap.add_argument("--realistic", action="store_true",
                    help="keep the presets' dropout and availability (rounds then wait for the 60 s deadline "
                         "whenever a selected device is gone, and those waits dominate the time axis)")
    ap.add_argument("--out", type=Path, default=Path("runs/pacing_benefit"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    data = load_split(DatasetConfig(name="digits", seed=args.seed))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(Path(tmp) / "bundle", data, args.seed)
        # The largest K fixes the budget; the others spend the same number of uplinked bytes.
        ks = sorted(set(args.ks))
        off = {"enabled": False, "statistic": args.statistic}
        top = run_one(Run(f"fixed K={ks[-1]}", ks[-1], off), bundle, data, args.seed, math.inf, args.rounds16,
                      args.realistic)
        budget = float(sum(r["bytes_up"] for r in top.rounds))
        fixed = {k: run_one(Run(f"fixed K={k}", k, off), bundle, data, args.seed, budget, args.max_rounds,
                            args.realistic) for k in ks[:-1]}
        fixed[ks[-1]] = top
        runs = [fixed[k] for k in ks]
        low, high = fixed[ks[0]], fixed[ks[-1]]
        calibrations = [(f"K={ks[0]} median", noise_quantile(low, 0.5)), (f"K={ks[0]} p75", noise_quantile(low, 0.75)),
                        (f"K={ks[-1]} median", noise_quantile(high, 0.5))]
        for name, threshold in calibrations:
            pacing = {"enabled": True, "statistic": args.statistic, "threshold": threshold, "max_extra_requests": 2,
                      "k_min": min(2, ks[0]), "k_max": max(args.k_max, ks[-1])}
            runs.append(run_one(Run(f"pacing, thr {threshold:.3f} = {name}", ks[0], pacing), bundle, data,
                                args.seed, budget, args.max_rounds, args.realistic))
    summary = summarize(runs, args.targets)
    png = plot(runs, args.targets, args.out / "pacing_benefit.png")
    out = {"devices": DEVICES, "trainable_parameters": bundle.manifest.num_trainable, "byte_budget": budget,
           "statistic": args.statistic, "ks": ks,
           "realistic_availability": args.realistic,
           "targets": args.targets, "runs": summary, "plot": str(png), "wall_s": time.perf_counter() - t0}
    (args.out / "pacing_benefit.json").write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"digits MLP ({out['trainable_parameters']} trainables), {DEVICES} devices, uplink budget "
          f"{budget / 1e3:.0f} kB per run; wall {out['wall_s']:.0f} s")
    head = "".join(f" | to {t:.2f}: kB, sim s" for t in args.targets)
    print(f"{'run':38s} rounds  mean K  extra  B/dev/round  noise(halves, spread)  final acc  best acc{head}")
    for s in summary:
        cells = ""
        for t in args.targets:
            hit = s["to_target"][str(t)]
            cells += f" | {hit['bytes'] / 1e3:7.1f}, {hit['sim_s']:6.0f}" if hit else " |       -,      -"
        print(f"{s['label']:38s} {s['rounds']:6d} {s['mean_k']:7.1f} {s['extra_requests']:6d} "
              f"{s['bytes_per_device_round']:11.0f} {s['median_noise_ratio']:9.3f} "
              f"{s['median_noise_ratio_spread']:7.3f}  "
              f"{s['final_accuracy']:9.3f} {s['best_accuracy']:9.3f}{cells}")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
