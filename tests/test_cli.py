"""Every `fwdfleet` command explains itself, without reStructuredText markup, and exits cleanly."""

from __future__ import annotations

import argparse

import pytest

from fwdfleet.cli.main import SUBCOMMANDS, build_parser, main


def _all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _all_parsers(child, (*path, name))


def test_every_subcommand_is_registered():
    registered = {p[0] for p, _ in _all_parsers(build_parser()) if len(p) == 1}
    assert registered == set(SUBCOMMANDS)


@pytest.mark.parametrize("path", [p for p, _ in _all_parsers(build_parser())], ids=lambda p: " ".join(p) or "root")
def test_help_is_plain_text(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fwdfleet")
    assert "``" not in out and ":mod:" not in out and ":class:" not in out


def test_unknown_command_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
