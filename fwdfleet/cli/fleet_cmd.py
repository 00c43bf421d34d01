"""``fwdfleet fleet``: emulate a fleet of devices against the real aggregator on this machine."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("fleet", help="emulate fleets of devices on this machine", description=__doc__)
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    em = fsub.add_parser(
        "emulate",
        help="run an emulated federated training from a TOML config",
        description="Run an emulated fleet from a TOML config and write a report and the trained model "
                    "(OUT/final/, OUT/best/). --print-config shows every key with its effective value; unknown "
                    "keys are refused naming the nearest valid one.",
    )
    em.add_argument("--config", default=None, help="TOML file (default: built-in defaults)")
    em.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. fleet.devices=100 or aggregator.optimizer.lr=0.3")
    em.add_argument("--json", action="store_true", help="print the summary as JSON")
    em.add_argument("--print-config", action="store_true",
                    help="print the effective configuration (file, overrides and defaults) as TOML and exit")
    em.set_defaults(func=_emulate)


def _emulate(args: argparse.Namespace) -> int:
    from fwdfleet.cli.demo_cmd import print_summary
    from fwdfleet.fleet.config import config_to_toml, load_fleet_config
    from fwdfleet.fleet.run import run_fleet

    cfg = load_fleet_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    summary = run_fleet(cfg, progress=not args.json, log=(lambda _m: None) if args.json else print)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print_summary(summary)
    return 130 if summary.interrupted else 0
