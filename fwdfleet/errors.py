"""Error types. Every message says what went wrong and what to do about it."""

from __future__ import annotations


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
