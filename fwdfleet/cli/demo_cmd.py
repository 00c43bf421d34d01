"""``fwdfleet demo``: export, aggregate and emulate a 20-device fleet on the bundled digits."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a model across 20 emulated devices by perturbed inference (no download)",
        description=(
            "Export an MLP classifier to a bundle, emulate 20 devices holding non-IID shards of scikit-learn's "
            "digits (shipped with fwdfleet), train it by perturbed inference against the real aggregator (seeds "
            "down, scalars up) and print the accuracy reached, the bytes each device uploaded and a device's peak "
            "memory. Runs in the base install; with the fleet extra the report also has plots and a progress bar."
        ),
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. fleet.rounds=20 or aggregator.perturbation.k=16")
    p.add_argument("--out", default=None, help="output folder (default runs/demo)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fwdfleet.fleet.demo import demo_config
    from fwdfleet.fleet.run import run_fleet

    overrides = list(args.overrides) + ([f'fleet.out_dir="{args.out}"'] if args.out else [])
    cfg = demo_config(overrides)
    summary = run_fleet(cfg, progress=not args.json, log=(lambda _m: None) if args.json else print)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    print_summary(summary)
    return 0


def print_summary(s: Any) -> None:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f} MB"

    print()
    print(f"accuracy        {pct(s.initial_accuracy)} -> {pct(s.final_accuracy)} after {s.rounds} rounds "
          f"({s.devices} devices, {s.trainable_parameters:,} trainable values)")
    if s.final_macro_f1 is not None:
        print(f"macro-F1        {pct(s.initial_macro_f1)} -> {pct(s.final_macro_f1)}")
    print(f"uplink/device   {s.uplink_bytes_per_device_per_round:.0f} bytes per round "
          f"({s.uplink_bytes_per_device_total / 1024:.1f} KiB in all); one dense float32 update would be "
          f"{s.dense_update_bytes:,} bytes")
    print(f"device memory   peak RSS {mb(s.peak_rss_train_step_mb)} for a training step vs "
          f"{mb(s.peak_rss_inference_mb)} for inference")
    if s.transport == "inprocess":
        print(f"time            {s.wall_seconds:.0f} s here; {s.simulated_fleet_seconds / 60:.1f} min simulated on "
              "the emulated phone/Pi fleet")
    else:
        print(f"time            {s.wall_seconds:.0f} s here, rounds over real gRPC between {s.devices} processes")
    from fwdfleet.fleet.report import PLOTS_HINT, can_plot

    if s.final_bundle:
        print(f"trained model   {s.final_bundle} (best by {s.best_metric}: {s.best_bundle})")
    print(f"report          {s.report}" + ("" if can_plot() else f" (tables only; {PLOTS_HINT})"))
