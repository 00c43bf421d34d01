"""Error types. Every message says what went wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FwdfleetError(Exception):
    """Base class of the errors the command line reports as a one-line cause."""


class BundleError(FwdfleetError):
    """A bundle is missing, corrupt, from a newer schema or does not match what was asked."""


class ExportError(FwdfleetError):
    """A model cannot be exported (missing folder, unsupported architecture, bad options)."""


class ConfigError(FwdfleetError):
    """A configuration value is invalid."""


class DataError(FwdfleetError):
    """A data file is missing or malformed."""


def unknown_keys_error(where: str, given: Iterable[str], known: Iterable[str]) -> ConfigError | None:
    """A :class:`ConfigError` naming each key of ``given`` not in ``known`` and the nearest valid key
    (``difflib``), or None when every key is known. ``where`` names the table, e.g. ``"[fleet]"``."""
    valid = sorted(set(known))
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return None
    parts = []
    for key in unknown:
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        parts.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
    return ConfigError(f"unknown key(s) {', '.join(parts)} in {where}; valid keys: {valid}")
