"""Serving the coordinator over gRPC: TLS, tokens, small upload limits, a round clock, clean stops.

:func:`serve` starts a ``grpc.server`` for a :class:`~aggregator.coordinator.Coordinator`:

* **TLS by default** (``tls_cert`` / ``tls_key`` PEM paths); ``insecure = true`` serves plaintext
  for local development only and says so loudly, on the loopback interface (127.0.0.1) unless
  ``host`` is given (a non-loopback host in insecure mode is warned about again);
* **device tokens** (:mod:`aggregator.auth`): with ``tokens_file`` every call must carry a token
  on the allow-list; without one the server refuses to start unless insecure;
* a **small receive limit** (``max_receive_bytes``, 16 KiB: a result is well under 1 KB). The
  bundle and the trainables go the other way, streamed in chunks, so they need no large limit.
  In ``dense`` / ``fedavg`` mode only ``SubmitVector`` may carry more:
  :func:`vector_request_limit` (4 bytes per trainable value plus ``max_receive_bytes`` for the
  metadata), checked per method by the servicer, the transport limit being the larger of the two;
* a background **round clock** calling ``coordinator.advance()`` every ``advance_interval_s``
  (rounds close at their deadlines even when no device calls);
* :meth:`RunningServer.stop`: stop accepting calls, let running ones finish within the grace
  period, stop the clock. The coordinator writes an atomic checkpoint after every applied update
  (and journals joins), so a stop (or a SIGKILL) loses at most the round in progress, which
  devices resubmit to the restarted server.

The ``[server]`` table of the aggregator's TOML file fills :class:`ServerConfig`.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import tempfile
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import grpc

from fwdfleet.aggregator.auth import BearerAuthInterceptor, TokenAllowList
from fwdfleet.aggregator.modes import server_mode
from fwdfleet.aggregator.servicer import BundleArchive, FleetServicer, ServicerSettings
from fwdfleet.aggregator.tls import server_credentials
from fwdfleet.bundle import Bundle
from fwdfleet.errors import ConfigError
from fwdfleet.protocol import rpc

log = logging.getLogger("fwdfleet.aggregator")

INSECURE_WARNING = (
    "WARNING: serving WITHOUT TLS (--insecure). Tokens and results travel in plaintext. "
    "Use this only on a trusted local machine; give tls_cert/tls_key (see `fwdfleet aggregator gen-certs`)."
)


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table: transport settings (never saved in a bundle or a checkpoint)."""

    host: str | None = None  # None: 0.0.0.0 with TLS, 127.0.0.1 (loopback only) when insecure
    port: int = 50051  # 0: any free port (the bound port is reported)
    bundle: str | None = None  # the bundle folder or zip devices download
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    tokens_file: str | None = None
    tokens_reload_s: float = 2.0  # the tokens file is re-read this soon after it changes (0: never)
    max_receive_bytes: int = 16 * 1024
    max_workers: int = 16
    max_concurrent_rpcs: int = 128  # calls in progress or queued; beyond it the transport answers RESOURCE_EXHAUSTED
    advance_interval_s: float = 0.5
    shutdown_grace_s: float = 5.0
    long_poll_max_s: float = 20.0
    long_poll_slots: int = 8
    retry_after_s: float = 1.0
    chunk_bytes: int = 1 << 20
    download_slots: int = 4
    downloads_per_device: int = 2
    download_timeout_s: float = 300.0
    max_devices_per_token: int = 10_000  # new device ids one token may register (a '*' token's whole fleet)
    heartbeat_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.host is None:
            object.__setattr__(self, "host", "127.0.0.1" if self.insecure else "0.0.0.0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"server.port must be in [0, 65535], got {self.port}")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise ValueError(
                "server.tls_cert and server.tls_key are required (TLS is on by default); make development "
                "certificates with `fwdfleet aggregator gen-certs`, or pass --insecure on a trusted machine"
            )
        if not self.insecure and not self.tokens_file:
            raise ValueError(
                "server.tokens_file is required with TLS: devices authenticate with tokens; create one with "
                "`fwdfleet aggregator add-token`"
            )
        if not 1024 <= self.max_receive_bytes <= 4 << 20:
            raise ValueError(f"server.max_receive_bytes must be in [1 KiB, 4 MiB], got {self.max_receive_bytes}")
        if self.max_workers < 2:
            raise ValueError(f"server.max_workers must be >= 2, got {self.max_workers}")
        if not self.tokens_reload_s >= 0:
            raise ValueError(f"server.tokens_reload_s must be >= 0, got {self.tokens_reload_s}")
        if self.max_concurrent_rpcs < 2:
            raise ValueError(f"server.max_concurrent_rpcs must be >= 2, got {self.max_concurrent_rpcs}")
        if self.long_poll_slots + self.download_slots >= self.max_workers:
            raise ValueError(
                f"server.long_poll_slots + server.download_slots ({self.long_poll_slots} + {self.download_slots}) "
                f"must be below server.max_workers ({self.max_workers}) so that long polls and downloads never "
                "take every worker thread"
            )
        if not self.advance_interval_s > 0:
            raise ValueError(f"server.advance_interval_s must be > 0, got {self.advance_interval_s}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"server.shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        self.servicer_settings()  # validates the servicer's fields

    def servicer_settings(self) -> ServicerSettings:
        return ServicerSettings(
            long_poll_max_s=self.long_poll_max_s,
            long_poll_slots=self.long_poll_slots,
            retry_after_s=self.retry_after_s,
            chunk_bytes=self.chunk_bytes,
            heartbeat_interval_s=self.heartbeat_interval_s,
            max_request_bytes=self.max_receive_bytes,
            max_vector_request_bytes=self.max_receive_bytes,
            download_slots=self.download_slots,
            downloads_per_device=self.downloads_per_device,
            download_timeout_s=self.download_timeout_s,
            max_devices_per_token=self.max_devices_per_token,
        )

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], *, source: str = "config") -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown} in [server]; valid keys: {sorted(known)}")
        try:
            return cls(**table)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e


def insecure_binding(config: ServerConfig) -> str:
    """What an insecure server says about where it listens."""
    if _is_loopback(str(config.host)):
        return (f"insecure mode listens on the loopback interface only ({config.host}); other machines cannot "
                "connect. To expose it anyway pass --host (e.g. --host 0.0.0.0), or better use TLS")
    return (f"WARNING: insecure mode listening on {config.host}, reachable from the network WITHOUT TLS "
            f"{'and without tokens' if not config.tokens_file else ''}: anyone who can reach this port can "
            "read and submit; use TLS (`fwdfleet aggregator gen-certs`)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def vector_request_limit(config: ServerConfig, mode: str, num_trainable: int) -> int:
    """SubmitVector's receive limit: a float32 per trainable value plus the scalar limit for the
    metadata in modes that upload a vector; just the scalar limit otherwise (the call is refused)."""
    if server_mode(mode).carries == "vector":
        return 4 * num_trainable + config.max_receive_bytes
    return config.max_receive_bytes


class RunningServer:
    """A started server: its bound port, its servicer, and how to stop it."""

    def __init__(
        self,
        server: grpc.Server,
        servicer: FleetServicer,
        port: int,
        config: ServerConfig,
        workdir: Path,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.port = port
        self.config = config
        self._workdir = workdir
        self._stop_clock = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._clock = threading.Thread(target=self._run_clock, name="fwdfleet-round-clock", daemon=True)
        self._clock.start()

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        return f"{host}:{self.port}"

    def _run_clock(self) -> None:
        while not self._stop_clock.wait(self.config.advance_interval_s):
            try:
                for event in self.servicer.advance():
                    log.info("round event: %s", event)
            except Exception:  # keep the clock alive; the error is the coordinator's to report
                log.exception("coordinator.advance() failed; retrying at the next tick")

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (idempotent): finish running calls, stop the clock, final checkpoint."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.shutdown_grace_s if grace is None else grace
            self.server.stop(grace).wait()
            self._stop_clock.set()
            self._clock.join()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._stopped.set()
            log.info("aggregator stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` completed (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)


def serve(config: ServerConfig, coordinator: Any, bundle: Bundle) -> RunningServer:
    """Start serving ``coordinator`` and ``bundle``; returns once the port is bound."""
    interceptors: list[grpc.ServerInterceptor] = []
    allow_list = (TokenAllowList.load(config.tokens_file, reload_s=config.tokens_reload_s)
                  if config.tokens_file else None)
    if allow_list is not None:
        interceptors.append(BearerAuthInterceptor(allow_list))
    if config.insecure:
        log.warning(INSECURE_WARNING)
        if allow_list is None:
            log.warning("WARNING: no server.tokens_file: any client may join (development only)")
        log.warning(insecure_binding(config))

    workdir = Path(tempfile.mkdtemp(prefix="fwdfleet-aggregator-"))
    try:
        archive = BundleArchive.from_bundle(bundle, workdir)
        mode = str(getattr(getattr(coordinator, "config", None), "mode", "scalar"))
        specs = tuple(bundle.manifest.trainables)
        vector_limit = vector_request_limit(config, mode, bundle.manifest.num_trainable)
        settings = replace(config.servicer_settings(), max_vector_request_bytes=vector_limit)
        servicer = FleetServicer(coordinator, archive, allow_list=allow_list, settings=settings, trainable_specs=specs)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="fwdfleet-rpc"),
            handlers=[rpc.generic_handler(servicer)],
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max(config.max_receive_bytes, vector_limit)),
                ("grpc.max_send_message_length", config.chunk_bytes + 4096),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        address = f"{config.host}:{config.port}"
        if config.insecure:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(config.tls_cert or "", config.tls_key or ""))
        if port == 0:
            raise ConfigError(f"cannot bind {address}: is the port in use? choose another with --port")
        server.start()
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log.info("serving on %s:%d (%s, mode %s, SubmitVector limit %d bytes)", config.host, port,
             "INSECURE" if config.insecure else "TLS", mode, vector_limit)
    return RunningServer(server, servicer, port, config, workdir)
