"""Entry point of the ``fwdfleet`` command.

Each subcommand lives in its own module under :mod:`fwdfleet.cli` and exposes
``register(subparsers)``. A module whose optional dependencies are missing (``export`` without
the export extra) still registers, and says which extra to install when it is run.
Errors of the toolkit (:class:`fwdfleet.errors.FwdfleetError`) exit with status 2 and a
one-line cause; nothing a user can fix is reported as a bare traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from fwdfleet import __version__
from fwdfleet.errors import FwdfleetError

# Subcommand modules, in the order `fwdfleet --help` lists them (the data flow's order).
SUBCOMMANDS: tuple[str, ...] = (
    "export",
    "bundle",
    "device",
    "aggregator",
    "fleet",
    "demo",
    "pack",
    "pff",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fwdfleet",
        description=(
            "Backpropagation-free federated on-device training. Export a model to an ONNX bundle, "
            "train it on devices by perturbed inference (seeds down, scalars up), aggregate on a "
            "gRPC server, and emulate whole fleets on a desktop."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fwdfleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"fwdfleet.cli.{name}_cmd")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("fwdfleet.cli."):
                continue  # subcommand not built yet
            raise
        module.register(sub)
    _plain_text(parser)
    return parser


_ROLE = re.compile(r":(?:mod|class|func|meth|attr):`~?([^`]+)`")


def _plain_text(parser: argparse.ArgumentParser) -> None:
    """Help texts come from docstrings: drop their reStructuredText markup for the terminal."""
    if parser.description:
        parser.description = _ROLE.sub(r"\1", parser.description).replace("``", "")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _plain_text(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except FwdfleetError as e:
        print(f"fwdfleet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fwdfleet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
