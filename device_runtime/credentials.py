"""The device's credential: its bearer token, from a flag, a file or ``$FWDFLEET_TOKEN``.

One reader for every place a token is taken from (``fwdfleet device run``, a device kit,
``fwdfleet aggregator status``, ``fwdfleet pack``), so that an unreadable or empty token file
is the same error everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from fwdfleet.errors import ConfigError

TOKEN_ENV = "FWDFLEET_TOKEN"


def read_token_file(path: str | Path) -> str:
    """The token stored in ``path`` (surrounding whitespace removed); an unreadable or empty file
    is a :class:`ConfigError` that names it."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e}") from e
    if not token:
        raise ConfigError(f"the token file {path} is empty; write the device's token into it")
    return token


def read_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The token from ``token``, else from ``token_file``, else from ``$FWDFLEET_TOKEN`` (None: no token)."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    return os.environ.get(TOKEN_ENV) or None
