"""The PFF parameter store: published layer parameters by (layer, version), on disk and over gRPC.

Why a small dedicated service (not the aggregator, not peer to peer)
--------------------------------------------------------------------
PFF nodes exchange whole layers (megabytes: a 2000x2000 layer is 16 MB) keyed by (layer,
version), and a node waits for the layers below it by long-polling. The aggregator's protocol is
round-based, moves seeds and scalars, and keeps a 16 KiB upload limit on purpose; bending it to
carry layers would weaken exactly what makes it safe. Peer to peer would make every node a
server that must stay up for the others, so a dead node would take its published layers with
it. A store in the middle keeps nodes stateless: a node needs one address, can die and be
restarted (or its layer given to another node) and fetches what it needs again; the store
writes every version to disk before acknowledging it, so a restarted store loses nothing
(see :class:`ParameterStore` for when it flushes). It
is ``service PffStore`` in ``proto/fwdfleet/v1/pff.proto``; the coordinator (:mod:`pff.run`)
runs it in its own process, ``python -m fwdfleet.pff.store DIR`` runs it alone.

On disk, version ``v`` of layer ``l`` is ``l{l}.v{v}.f32`` (the tensors' raw float32 bytes, one
after another) and ``l{l}.v{v}.json`` (names, shapes, offsets, sha256, the task record). The
JSON is written last, atomically, and marks the version as published.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from fwdfleet.pff.wire import (
    Params,
    Progress,
    PublishedEntry,
    StoreError,
    StoreStub,
    TaskRecord,
    add_store_servicer,
    check_stored,
)
from fwdfleet.protocol.f32 import EncodedTensor, encode_tensors
from fwdfleet.protocol.retry import Backoff, backoff_delay, is_transient, retry_after

MAX_MESSAGE_BYTES = 512 << 20  # a layer travels in one message
MAX_WAIT_SECONDS = 30.0
T = TypeVar("T")
STORE_BACKOFF = Backoff(initial_s=0.05, max_s=2.0, multiplier=2.0, jitter=0.5)
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class LayerVersion:
    layer: int
    version: int
    params: Params
    record: TaskRecord


@dataclass(frozen=True)
class _Stored:
    layer: int
    version: int
    tensors: list[EncodedTensor]
    record: TaskRecord

    def view(self) -> LayerVersion:
        return LayerVersion(self.layer, self.version, {t.name: t.array() for t in self.tensors}, self.record)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it); no fsync (see :func:`_sync`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sync(paths: list[Path]) -> None:
    """Flush ``paths`` and their folder to the disk (survives a machine crash, not only a store crash)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if paths:
        fd = os.open(paths[0].parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ParameterStore:
    """Thread-safe, persistent map (layer, version) -> parameters; a version once published never changes.

    A publication is written (atomically: a temporary file renamed) and made visible to waiting fetches
    at once; it is flushed to the disk (fsync) before :meth:`publish` returns, i.e. before the publisher
    is acknowledged. So a store process that dies loses nothing written, and the fsync's latency is off
    the path of the nodes waiting for the layer. (A machine crash between the two can lose a version a
    node already used: training is deterministic, so the publisher retrains the same bytes.)
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._versions: dict[tuple[int, int], _Stored] = {}
        self._progress: dict[str, Progress] = {}
        for meta in sorted(self.directory.glob("l*.v*.json")):
            stored = self._load(meta)
            self._versions[(stored.layer, stored.version)] = stored

    def _load(self, meta_path: Path) -> _Stored:
        try:
            meta = json.loads(meta_path.read_text())
            blob = meta_path.with_suffix(".f32").read_bytes()
            tensors = []
            for t in meta["tensors"]:
                data, shape = blob[t["offset"] : t["offset"] + t["nbytes"]], tuple(int(d) for d in t["shape"])
                tensors.append(check_stored(EncodedTensor(t["name"], shape, data, t["sha256"])))  # size, digest, finite
            return _Stored(int(meta["layer"]), int(meta["version"]), tensors, TaskRecord.from_dict(meta["record"]))
        except (OSError, KeyError, TypeError, ValueError, StoreError) as e:
            raise StoreError(f"published layer file {meta_path} is unreadable ({e}); delete it and its .f32 "
                             "to have that layer version trained again") from e

    def publish(self, layer: int, version: int, params: Mapping[str, np.ndarray], record: TaskRecord) -> bool:
        """Persist and publish; returns True if this exact version was already published (a retry)."""
        return self.publish_encoded(layer, version, encode_tensors(params), record)

    def publish_encoded(self, layer: int, version: int, tensors: list[EncodedTensor], record: TaskRecord) -> bool:
        """:meth:`publish` for tensors already encoded and checked (as received over gRPC)."""
        if not tensors:
            raise StoreError("a published layer needs at least one tensor")
        with self._cond:
            old = self._versions.get((layer, version))
            if old is not None:
                if {t.name: t.sha256 for t in old.tensors} == {t.name: t.sha256 for t in tensors}:
                    return True
                raise StoreError(f"layer {layer} version {version} is already published with other values; "
                                 "published versions are immutable")
            stem = f"l{layer}.v{version}"
            entries, offset = [], 0
            for t in tensors:
                entries.append({"name": t.name, "shape": list(t.shape), "offset": offset, "nbytes": len(t.data),
                                "sha256": t.sha256})
                offset += len(t.data)
            paths = [self.directory / f"{stem}.f32", self.directory / f"{stem}.json"]
            _write_atomic(paths[0], b"".join(t.data for t in tensors))
            meta = {"layer": layer, "version": version, "tensors": entries, "record": record.to_dict()}
            _write_atomic(paths[1], json.dumps(meta, indent=1).encode())  # last: marks the version published
            self._versions[(layer, version)] = _Stored(layer, version, list(tensors), record)
            self._cond.notify_all()
        _sync(paths)
        return False

    def fetch_encoded(self, layer: int, version: int, wait_seconds: float = 0.0) -> _Stored | None:
        deadline = time.monotonic() + max(0.0, min(wait_seconds, MAX_WAIT_SECONDS))
        with self._cond:
            while (layer, version) not in self._versions:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._versions[(layer, version)]

    def fetch(self, layer: int, version: int, wait_seconds: float = 0.0) -> LayerVersion | None:
        stored = self.fetch_encoded(layer, version, wait_seconds)
        return None if stored is None else stored.view()

    def report(self, progress: Progress) -> None:
        with self._cond:
            self._progress[progress.node_id] = progress

    def status(self) -> tuple[list[PublishedEntry], list[Progress]]:
        with self._cond:
            published = [(lv.layer, lv.version, lv.record) for lv in self._versions.values()]
            return sorted(published, key=lambda p: (p[1], p[0])), sorted(self._progress.values(),
                                                                         key=lambda p: p.node_id)


class StoreServer:
    """The store served on ``host:port`` (port 0: any free port; see :attr:`address`).

    With ``tls_cert`` / ``tls_key`` it serves TLS and with ``tokens_file`` every call must carry a
    token of that allow-list (the aggregator's files and rules: :mod:`fwdfleet.aggregator.auth`,
    reloaded on change). Without TLS it only listens on a loopback address (a local run's nodes)."""

    def __init__(self, directory: str | Path, *, host: str = "127.0.0.1", port: int = 0, workers: int = 16,
                 tls_cert: str | None = None, tls_key: str | None = None, tokens_file: str | None = None) -> None:
        from fwdfleet.aggregator.auth import BearerAuthInterceptor, TokenAllowList
        from fwdfleet.aggregator.server import _is_loopback
        from fwdfleet.aggregator.tls import server_credentials

        if bool(tls_cert) != bool(tls_key):
            raise StoreError("give both --tls-cert and --tls-key (or neither, on a loopback address)")
        if not tls_cert and not _is_loopback(host):
            raise StoreError(f"the PFF store serves plaintext only on a loopback address, not {host}: give "
                             "--tls-cert/--tls-key (`fwdfleet aggregator gen-certs`) and --tokens-file")
        interceptors = [BearerAuthInterceptor(TokenAllowList.load(tokens_file))] if tokens_file else []
        self.store = ParameterStore(directory)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pff-store"),
                                   options=GRPC_OPTIONS, interceptors=interceptors)
        add_store_servicer(self._server, self.store)
        if tls_cert and tls_key:
            bound = self._server.add_secure_port(f"{host}:{port}", server_credentials(tls_cert, tls_key))
        else:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise StoreError(f"cannot listen on {host}:{port}; choose another --port")
        self.address = f"{host}:{bound}"
        self._server.start()

    def stop(self, grace: float = 0.5) -> None:
        self._server.stop(grace).wait()


class StoreClient:
    """Calls to the store; retries while it is unreachable (e.g. being restarted) for ``retry_seconds``."""

    def __init__(self, address: str, *, retry_seconds: float = 60.0, root_cert: str | None = None,
                 token: str | None = None, server_name: str | None = None) -> None:
        """``root_cert``: the CA of a TLS store (its PEM path); ``token``: a bearer token (TLS only)."""
        self.address = address
        self.retry_seconds = retry_seconds
        if root_cert or token:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(root_cert).read_bytes() if root_cert else None)
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
            options = [*GRPC_OPTIONS, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = StoreStub(self._channel)
        self._rng = random.Random()

    def _call(self, call: Callable[[], T]) -> T:
        """``call()``, retried while the store is unreachable; its refusals as :class:`StoreError`."""
        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise StoreError(f"PFF store at {self.address}: {e.details()}") from e
                delay = backoff_delay(attempt, STORE_BACKOFF, self._rng, retry_after(e))
                if not is_transient(e) or time.monotonic() + delay > deadline:
                    raise StoreError(f"PFF store at {self.address}: {code.name} ({e.details()}); "
                                     "is the store running?") from e
                time.sleep(delay)
                attempt += 1

    def publish(self, layer: int, version: int, params: Mapping[str, np.ndarray], record: TaskRecord) -> bool:
        return self._call(lambda: self._stub.publish(layer, version, params, record, timeout=120.0))

    def fetch(self, layer: int, version: int, wait_seconds: float = 0.0) -> LayerVersion | None:
        found = self._call(lambda: self._stub.fetch(layer, version, wait_seconds, timeout=wait_seconds + 60.0))
        return None if found is None else LayerVersion(layer, version, *found)

    def wait_for(self, layer: int, version: int, poll_seconds: float = 10.0,
                 stop: threading.Event | None = None) -> LayerVersion:
        """Block until (layer, version) is published (or ``stop`` is set: StoreError)."""
        while stop is None or not stop.is_set():
            lv = self.fetch(layer, version, poll_seconds)
            if lv is not None:
                return lv
        raise StoreError(f"stopped while waiting for layer {layer} version {version}")

    def report(self, progress: Progress) -> None:
        self._call(lambda: self._stub.report(progress, timeout=10.0))

    def status(self) -> tuple[list[PublishedEntry], list[Progress]]:
        return self._call(lambda: self._stub.status(timeout=10.0))

    def close(self) -> None:
        self._channel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a PFF parameter store (persisted in DIR).")
    p.add_argument("directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-cert", help="server certificate (PEM); required unless --host is a loopback address")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tokens-file", help="token allow-list (`fwdfleet aggregator add-token`), as the aggregator's")
    args = p.parse_args(argv)
    server = StoreServer(args.directory, host=args.host, port=args.port, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, tokens_file=args.tokens_file)
    print(f"pff store serving {args.directory} on {server.address}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
