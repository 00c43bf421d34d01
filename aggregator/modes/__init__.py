"""The server halves of the upload modes, one module per mode (``scalar``, ``dense``, ``fedavg``, ...).

:func:`server_mode` finds a mode by name (see :mod:`fwdfleet.modes`); a new mode is a new module
here holding ``MODE = <a ServerMode subclass>()``, and its device half in
``fwdfleet/device_runtime/modes/``. Nothing else changes.
"""

from __future__ import annotations

from fwdfleet.aggregator.modes._base import ServerMode
from fwdfleet.modes import find_mode, mode_names

__all__ = ["ServerMode", "server_mode", "server_mode_names"]


def server_mode(name: str) -> ServerMode:
    mode = find_mode(__name__, name)
    if not isinstance(mode, ServerMode):
        raise TypeError(f"{__name__}.{name}.MODE is not a ServerMode")
    return mode


def server_mode_names() -> tuple[str, ...]:
    return mode_names(__name__)
