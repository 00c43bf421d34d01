"""The upload-mode interface both sides share, and how a mode is found by its name.

An upload mode says what a device sends each round and how the aggregator turns a round's
uploads into an update. Each mode has two halves, one per side, which never import each other:

* the **device half**, ``fwdfleet/device_runtime/modes/<name>.py``: a module-level ``MODE``
  object with ``name``, ``carries`` and ``compute(worker, task, data) -> Upload``;
* the **server half**, ``fwdfleet/aggregator/modes/<name>.py``: a module-level ``MODE`` (a
  :class:`fwdfleet.aggregator.modes.ServerMode`) that checks the setup, puts the mode's settings
  into each task, validates and accepts an upload, journals it, and makes the round's update.

Both registries are the modules of their package: :func:`find_mode` imports
``<package>.<name>`` and returns its ``MODE``, so adding a mode is adding one module per side
(plus its tests), and no code anywhere branches on a mode's name. The wire names a mode by its
string (``RoundTask.upload_mode``); what travels is fixed by ``carries``:

* ``"scalars"``: the result's ``(k, d_k)`` pairs (``Submit``);
* ``"vector"``: one flat float32 vector beside the result's counts and loss (``SubmitVector``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Literal

from fwdfleet.errors import ConfigError

Carries = Literal["scalars", "vector"]
CARRIES: tuple[Carries, ...] = ("scalars", "vector")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def mode_names(package: str) -> tuple[str, ...]:
    """The modes a registry package holds (its public modules), sorted."""
    pkg = importlib.import_module(package)
    return tuple(sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")))


def find_mode(package: str, name: str) -> object:
    """The ``MODE`` object of mode ``name`` in registry ``package``; :class:`ConfigError` naming the
    modes there is when there is none."""
    if not isinstance(name, str) or not _NAME.match(name) or name not in mode_names(package):
        raise ConfigError(f"unknown upload mode {name!r}; this installation has {list(mode_names(package))}")
    module = importlib.import_module(f"{package}.{name}")
    mode = getattr(module, "MODE", None)
    if mode is None or getattr(mode, "name", None) != name or getattr(mode, "carries", None) not in CARRIES:
        raise ConfigError(f"{package}.{name} defines no valid MODE (name {name!r}, carries one of {CARRIES})")
    return mode
