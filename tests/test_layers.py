"""Layers point one way: every import of every library module, read with ``ast``.

The layers (docs: DESIGN.md, "The layers"), lowest first:

* the foundation: the top-level modules of ``fwdfleet`` and ``fwdfleet.protocol``;
* ``fwdfleet.device_runtime`` and ``fwdfleet.aggregator``, each on the foundation only and never
  on each other;
* ``fwdfleet.export``;
* ``fwdfleet.fleet`` (emulation, experiments);
* ``fwdfleet.pff`` (pipeline FF: it reads the fleet's named datasets);
* ``fwdfleet.cli``, imported by nothing.

A module may import its own package and any lower layer. Function-level (lazy) imports count
the same as module-level ones, and so do ``importlib.import_module("...")`` calls with a literal
name: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("device_runtime", "aggregator", "export", "fleet", "pff")  # real folders, linked under fwdfleet/
LAYER = {"foundation": 0, "device_runtime": 1, "aggregator": 1, "export": 2, "fleet": 3, "pff": 4, "cli": 5}
SIDEWAYS_FORBIDDEN = {frozenset({"device_runtime", "aggregator"})}

# Edges (importer module -> imported module) still pointing the wrong way: none left. A new
# violation fails the test.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def _module_files() -> Iterator[tuple[str, Path]]:
    """``(module name, file)`` of every library module (generated protobuf stubs included)."""
    for path in sorted((ROOT / "fwdfleet").rglob("*.py")):
        rel = path.relative_to(ROOT / "fwdfleet")
        if rel.parts[0] in PACKAGES:
            continue  # symlinks to the real folders: walked below
        yield _name("fwdfleet", rel), path
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield _name(f"fwdfleet.{pkg}", path.relative_to(ROOT / pkg)), path


def _name(prefix: str, rel: Path) -> str:
    parts = [prefix, *rel.with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(module: str, path: Path) -> set[str]:
    """Every ``fwdfleet`` module ``module`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {_known(name) for name in found if name == "fwdfleet" or name.startswith("fwdfleet.")} - {None}


_MODULES = dict(_module_files())


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a library module (``from m import attr`` names attrs too)."""
    while name:
        if name in _MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYER and parts[1] != "foundation":
        return parts[1]
    return "foundation"


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when it may."""
    a, b = layer_of(importer), layer_of(imported)
    if b == "cli" and a != "cli":
        return "the command line is imported by nothing"
    if a == b:
        return None
    if frozenset({a, b}) in SIDEWAYS_FORBIDDEN:
        return f"{a} and {b} are independent of each other"
    if LAYER[b] >= LAYER[a]:
        return f"{a} (layer {LAYER[a]}) must not import {b} (layer {LAYER[b]})"
    return None


def all_violations() -> dict[tuple[str, str], str]:
    out = {}
    for module, path in _MODULES.items():
        for imported in imports_of(module, path):
            why = violation(module, imported)
            if why and imported != module:
                out[(module, imported)] = why
    return out


def test_every_package_is_walked() -> None:
    layers = {layer_of(m) for m in _MODULES}
    assert layers == set(LAYER), layers
    assert "fwdfleet.perturbation" in _MODULES and "fwdfleet.protocol.serde" in _MODULES


def test_layers_point_one_way() -> None:
    found = all_violations()
    new = {edge: why for edge, why in found.items() if edge not in KNOWN_VIOLATIONS}
    assert not new, "imports pointing up or sideways:\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(new.items()))
    gone = KNOWN_VIOLATIONS - found.keys()
    assert not gone, f"fixed, delete from KNOWN_VIOLATIONS: {sorted(gone)}"


def test_only_pff_wire_touches_the_pff_messages() -> None:
    """pff.wire builds and reads every PffStore message; the store and the nodes use domain values."""
    generated = {"fwdfleet.protocol.v1.pff_pb2", "fwdfleet.protocol.v1.pff_pb2_grpc"}
    users = {m for m, path in _MODULES.items() if imports_of(m, path) & generated} - generated
    assert users == {"fwdfleet.pff.wire"}, users


# The checker itself: each kind of import is seen, each kind of edge judged.


@pytest.mark.parametrize(("importer", "imported", "bad"), [
    ("fwdfleet.aggregator.rounds", "fwdfleet.task", False),
    ("fwdfleet.aggregator.rounds", "fwdfleet.device_runtime.estimator", True),
    ("fwdfleet.device_runtime.client", "fwdfleet.aggregator.auth", True),
    ("fwdfleet.perturbation", "fwdfleet.device_runtime.sampling", True),
    ("fwdfleet.protocol.serde", "fwdfleet.aggregator.records", True),
    ("fwdfleet.fleet.emulate", "fwdfleet.aggregator.coordinator", False),
    ("fwdfleet.fleet.emulate", "fwdfleet.export.mlp", False),
    ("fwdfleet.export.mlp", "fwdfleet.fleet.emulate", True),
    ("fwdfleet.fleet.grpc_fleet", "fwdfleet.cli.aggregator_cmd", True),
    ("fwdfleet.pff.run", "fwdfleet.fleet.datasets", False),
    ("fwdfleet.fleet.run", "fwdfleet.pff.run", True),
    ("fwdfleet.cli.main", "fwdfleet.fleet.run", False),
    ("fwdfleet.cli.main", "fwdfleet.cli.fleet_cmd", False),
])
def test_violation_rules(importer: str, imported: str, bad: bool) -> None:
    assert (violation(importer, imported) is not None) == bad


def test_lazy_relative_and_dynamic_imports_are_seen(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import importlib\n"
        "def f():\n"
        "    from fwdfleet.cli import aggregator_cmd\n"
        "    from . import estimator\n"
        "    return importlib.import_module('fwdfleet.aggregator.auth')\n"
    )
    got = imports_of("fwdfleet.device_runtime.m", src)
    assert {"fwdfleet.cli.aggregator_cmd", "fwdfleet.device_runtime.estimator", "fwdfleet.aggregator.auth"} <= got
