"""Device authentication: bearer tokens checked against an allow-list of token hashes.

A device sends ``authorization: Bearer <token>`` in the metadata of every call. The aggregator
keeps only SHA-256 hashes of the tokens, in a text file, one entry per line::

    # sha256 of the token                                              who   devices it may speak for
    3f1c...e9a0  phone-17  phone-17
    77ab...01cd  fleet     *

The second column names the holder (for logs); the third binds the token to one device id, or
``*`` for any device (an emulated fleet, an operator running ``aggregator status``). A missing
or unknown token is refused with ``UNAUTHENTICATED`` by :class:`BearerAuthInterceptor` before any
handler runs; a token used for another device's id is refused by the servicer with
``PERMISSION_DENIED`` (:meth:`TokenAllowList.may_act_for`).

Hashes are compared with :func:`hmac.compare_digest` against every entry (no early exit), so the
time a check takes does not depend on how much of a guess was right.

A list loaded from a file (:meth:`TokenAllowList.load`) watches it: at most every ``reload_s``
seconds a check looks at the file's size, modification time and inode, and re-reads it when they
changed, so a revoked token is refused within seconds without a restart. A file that no longer
parses (or vanished) keeps the last good list in force and the error is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fwdfleet.errors import ConfigError
from fwdfleet.protocol import AUTH_METADATA_KEY as METADATA_KEY
from fwdfleet.protocol import bearer_metadata

__all__ = ["BearerAuthInterceptor", "Principal", "TokenAllowList", "bearer_metadata", "hash_token", "new_token"]
log = logging.getLogger("fwdfleet.aggregator")
_SCHEME = "bearer "
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ANY_DEVICE = "*"


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the allow-list file."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who holds a token, and which device id it may act for (``*``: any)."""

    name: str
    device: str = ANY_DEVICE

    def may_act_for(self, device_id: str) -> bool:
        return self.device == ANY_DEVICE or hmac.compare_digest(self.device.encode(), device_id.encode())


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenAllowList:
    """The accepted token hashes and whom they belong to."""

    def __init__(self, entries: Iterable[tuple[str, Principal]]) -> None:
        self._entries: list[_Entry] = _entries(entries)
        self._path: Path | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._reload_s = 0.0
        self._checked = 0.0
        self._reload_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | Path, *, reload_s: float = 2.0) -> TokenAllowList:
        """The list in ``path``, re-read when the file changes (checked at most every ``reload_s``
        seconds; 0: never)."""
        path = Path(path)
        stamp = _stamp(path)
        allow_list = cls(_parse(path))
        allow_list._path, allow_list._stamp, allow_list._reload_s = path, stamp, reload_s
        allow_list._checked = time.monotonic()
        return allow_list

    def _maybe_reload(self) -> None:
        if self._path is None or self._reload_s <= 0:
            return
        now = time.monotonic()
        if now - self._checked < self._reload_s or not self._reload_lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                return
            try:
                entries = _entries(_parse(self._path))
            except ConfigError as e:
                log.error("token allow-list %s changed but cannot be used (%s); the previous list stays in force",
                          self._path, e)
                return
            before = len(self._entries)
            self._entries, self._stamp = entries, stamp
            log.warning("token allow-list %s reloaded: %d token(s), was %d", self._path, len(entries), before)
        finally:
            self._reload_lock.release()

    def identify(self, token: str | None) -> Principal | None:
        """The principal holding ``token``, or None; constant time in where a guess differs."""
        self._maybe_reload()
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        return found

    def identify_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal | None:
        return self.identify(token_from_metadata(metadata))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _entries(entries: Iterable[tuple[str, Principal]]) -> list[_Entry]:
    out = []
    for digest, principal in entries:
        if not _HEX64.match(digest):
            raise ConfigError(f"token hash {digest[:16]!r}... is not a 64-character lowercase hex SHA-256")
        out.append(_Entry(bytes.fromhex(digest), principal))
    if not out:
        raise ConfigError("the token allow-list is empty; add a token with `fwdfleet aggregator add-token`")
    return out


def _parse(path: Path) -> list[tuple[str, Principal]]:
    """The entries of an allow-list file (:class:`ConfigError` naming the line when one is wrong)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the token allow-list {path}: {e}") from e
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise ConfigError(
                f"{path}:{lineno}: expected '<sha256-hex> <name> [<device-id or *>]', got {len(parts)} fields"
            )
        digest, name = parts[0].lower(), parts[1]
        if not _HEX64.match(digest):
            raise ConfigError(f"{path}:{lineno}: {parts[0][:16]!r}... is not a hex SHA-256 of a token")
        entries.append((digest, Principal(name=name, device=parts[2] if len(parts) == 3 else ANY_DEVICE)))
    if not entries:
        raise ConfigError(f"{path}: the token allow-list is empty; add a token with "
                          "`fwdfleet aggregator add-token`")
    return entries


def token_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.lower().startswith(_SCHEME):
                return text[len(_SCHEME) :].strip()
            return None
    return None


def append_token(path: str | Path, token: str, name: str, device: str = ANY_DEVICE) -> None:
    """Add the hash of ``token`` to the allow-list file (created if missing)."""
    if not re.fullmatch(r"[^\s#]+", name) or not re.fullmatch(r"[^\s#]+", device):
        raise ConfigError("token name and device must be non-empty and contain no spaces or '#'")
    path = Path(path)
    with open(path, "a", encoding="utf-8") as f:
        if path.stat().st_size == 0:
            f.write("# fwdfleet token allow-list: <sha256 of token> <name> <device id or *>\n")
        f.write(f"{hash_token(token)} {name} {device}\n")


UNKNOWN_TOKEN = "unknown token: it is not on this aggregator's allow-list; ask the operator for a token"


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs
    """Refuses every call whose bearer token is missing or not on the allow-list."""

    def __init__(self, allow_list: TokenAllowList) -> None:
        self.allow_list = allow_list

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = handler_call_details.invocation_metadata
        token = token_from_metadata(metadata)
        if token is None:
            return _abort_handler(
                handler, "missing credentials: send 'authorization: Bearer <token>' metadata (device token)"
            )
        if self.allow_list.identify(token) is None:
            return _abort_handler(handler, UNKNOWN_TOKEN)
        return handler
