"""The device's side of the protocol: join, download, poll, train, submit; survive lost connections.

:class:`DeviceClient` runs the loop a phone or a Raspberry Pi runs:

1. **join** the aggregator with a device id and profile (a bearer token in the metadata);
2. **download the bundle** when it is missing or its sha256 differs from what the aggregator
   serves (resumed from the last byte after a broken stream, verified before use);
3. **long-poll for a task**; download the trainable tensors whenever the model version changed;
4. **estimate** with :func:`device_runtime.estimator.estimate` on a minibatch of its
   :class:`~device_runtime.data.LocalDataset` (the guide for discriminative sampling is the
   difference of the last two model versions, computed locally);
5. **submit** the result.

Steps 4 and 5 are the device worker's (:class:`~fwdfleet.device_runtime.worker.DeviceWorker`,
the same code an emulated device runs): the task names its upload mode and carries every
hyperparameter of the round, the mode's device half (:mod:`fwdfleet.device_runtime.modes`)
computes the upload, which goes up with ``Submit`` ((k, d_k) pairs) or ``SubmitVector`` (one flat
vector). ``local_train`` / ``ff_train`` only fill what a task leaves open. The device declares its
number of local examples when it joins (the aggregator bounds its upload weight by it).

Transient failures (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED`` from a busy server, ``DEADLINE_EXCEEDED``,
a stream broken mid-download) are retried with jittered exponential backoff, never sooner than a
busy server's ``retry-after`` (:mod:`fwdfleet.protocol.retry`, the one such helper). When the
aggregator forgot the device (it restarted), the client joins again and resubmits the same
result: submissions are idempotent on the server, so a retry is never counted twice. A refused
result (stale round, invalid value) is dropped with a log line and the loop goes on; a refused
token stops the client with an error saying so. :meth:`DeviceClient.stop` ends the loop from
another thread at the next safe point.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from fwdfleet import __version__
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.device_runtime.data import LocalDataset
from fwdfleet.device_runtime.downloads import (
    CorruptDownload,
    UnsafeBundle,
    extract_bundle,
    read_trainables,
    resume_download,
)
from fwdfleet.device_runtime.ff_train import FFTrainConfig
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import LocalTrainConfig
from fwdfleet.device_runtime.worker import DeviceWorker, WorkerDefaults
from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol import bearer_metadata, rpc, serde
from fwdfleet.protocol.retry import TRANSIENT, Backoff, is_transient, retry_after
from fwdfleet.protocol.retry import backoff_delay as _backoff_delay
from fwdfleet.task import RoundTask, Upload

log = logging.getLogger("fwdfleet.device")
T = TypeVar("T")

# Transient: the server is away, slow, busy or restarting (a stopping server cancels running calls; this
# client never cancels its own, so CANCELLED means the other side went away).
RETRYABLE = TRANSIENT
_DROP_RESULT = frozenset(
    {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}
)


class ClientError(FwdfleetError):
    """The device cannot go on (refused token, protocol mismatch, corrupt download, gave up retrying)."""


# fedavg on non-FF bundles: a few local steps per round unless the device says otherwise.
DEFAULT_LOCAL_TRAIN = LocalTrainConfig(steps=10, eval_every=0)


class _Stopped(Exception):
    pass


@dataclass(frozen=True)
class DeviceClientConfig:
    """How a device reaches its aggregator. Validated on construction; errors name the field."""

    address: str  # host:port
    device_id: str
    token: str | None = None
    root_cert: str | None = None  # PEM of the CA that signed the server's certificate (None: system roots)
    insecure: bool = False  # plaintext, local development only
    server_name: str | None = None  # TLS name to verify when the address is not the certificate's name
    long_poll_s: float = 20.0
    rpc_timeout_s: float = 30.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay that is random
    max_retries: int = 0  # consecutive failed attempts before giving up; 0: retry until stopped
    platform: str = field(default_factory=lambda: f"{platform.system().lower()}-{platform.machine().lower()}")
    ram_mb: int = 0
    compute_speed: float = 1.0

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"DeviceClientConfig.address must be host:port, got {self.address!r}")
        if not self.device_id or len(self.device_id) > 256:
            raise ValueError("DeviceClientConfig.device_id must be 1..256 characters")
        if self.insecure and self.root_cert:
            raise ValueError("DeviceClientConfig.root_cert and insecure are exclusive: TLS or plaintext")
        for name in ("long_poll_s", "initial_backoff_s", "backoff_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceClientConfig.{name} must be a finite number >= 0, got {value}")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"DeviceClientConfig.rpc_timeout_s must be > 0, got {self.rpc_timeout_s}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError("DeviceClientConfig.max_backoff_s must be >= initial_backoff_s")
        if self.backoff_multiplier < 1:
            raise ValueError("DeviceClientConfig.backoff_multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"DeviceClientConfig.jitter must be in [0, 1], got {self.jitter}")
        if self.max_retries < 0:
            raise ValueError("DeviceClientConfig.max_retries must be >= 0 (0: retry until stopped)")
        if self.ram_mb < 0 or not self.compute_speed > 0:
            raise ValueError("DeviceClientConfig.ram_mb must be >= 0 and compute_speed > 0")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.initial_backoff_s, self.max_backoff_s, self.backoff_multiplier, self.jitter)


def backoff_delay(attempt: int, config: DeviceClientConfig, rng: random.Random, floor_s: float = 0.0) -> float:
    """Jittered exponential backoff with this device's settings (:func:`fwdfleet.protocol.retry.backoff_delay`)."""
    return _backoff_delay(attempt, config.backoff, rng, floor_s)


@dataclass
class ClientStats:
    rounds: int = 0  # results the aggregator accepted (or had already accepted)
    dropped: int = 0  # results it refused (stale, invalid)
    retries: int = 0
    joins: int = 0
    bundle_downloads: int = 0
    trainable_downloads: int = 0
    uplink_bytes: int = 0


def _channel(config: DeviceClientConfig) -> grpc.Channel:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 8 << 20)]
    if config.insecure:
        return grpc.insecure_channel(config.address, options=options)
    root = Path(config.root_cert).read_bytes() if config.root_cert else None
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    return grpc.secure_channel(config.address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


class DeviceClient:
    """A device taking part in federated rounds (see the module docstring)."""

    def __init__(
        self,
        config: DeviceClientConfig,
        bundle_dir: str | Path,
        dataset: LocalDataset | Callable[[Bundle], LocalDataset],
        *,
        session_options: SessionOptions | None = None,
        seed: int | None = None,
        local_train: LocalTrainConfig | None = None,
        ff_train: FFTrainConfig | None = None,
    ) -> None:
        self.config = config
        # local-training modes only: what a task leaves open (lr 0, no objective) comes from here
        self.defaults = WorkerDefaults(local_train=local_train or DEFAULT_LOCAL_TRAIN,
                                       ff_train=ff_train or FFTrainConfig())
        self.bundle_dir = Path(bundle_dir)
        # A dataset, or a factory building it from the downloaded bundle (a tokenizer ships in it).
        self._dataset_factory = None if hasattr(dataset, "batch") else dataset
        self.dataset: LocalDataset | None = dataset if hasattr(dataset, "batch") else None  # type: ignore[assignment]
        self.session_options = session_options or SessionOptions()
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._metadata = bearer_metadata(config.token) if config.token else ()
        self._channel: grpc.Channel | None = None
        self._joined: serde.Joined | None = None
        self._bundle: Bundle | None = None
        self._session: BundleSession | None = None
        self._worker: DeviceWorker | None = None
        self._declared = 0  # the number of local examples told at the last join

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to return at the next safe point (safe from any thread)."""
        self._stop.set()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def run(self, rounds: int | None = None) -> ClientStats:
        """Take part until ``rounds`` results were accepted (None: until :meth:`stop`)."""
        try:
            while not self._stop.is_set() and (rounds is None or self.stats.rounds < rounds):
                self._ensure_joined()
                task = self._next_task()
                if task is None:
                    continue
                self._submit(task, self._train(task))
        except _Stopped:
            pass
        finally:
            self.close()
        return self.stats

    # ------------------------------------------------------------------ steps

    def _ensure_joined(self) -> None:
        if self._joined is not None:
            return
        self._joined = self._join()
        self._ensure_bundle(self._joined.bundle_sha256)
        if self.dataset is not None and len(self.dataset) != self._declared:  # built from the bundle just now
            self._joined = self._join()

    def _join(self) -> serde.Joined:
        self._declared = len(self.dataset) if self.dataset is not None else 0
        profile = serde.DeviceProfile(platform=self.config.platform, ram_mb=self.config.ram_mb,
                                      compute_speed=self.config.compute_speed, num_samples=self._declared)
        request = serde.join_request(self.config.device_id, profile, __version__)
        joined = self._retry("join", lambda: serde.joined_from_bytes(self._unary("Join", request)))
        self.stats.joins += 1
        log.info("joined as device index %d (model version %d)", joined.device_index, joined.model_version)
        return joined

    def _next_task(self) -> RoundTask | None:
        request = serde.get_task_request(self.config.device_id, self.config.long_poll_s)
        poll = self._retry(
            "get a task",
            lambda: serde.task_poll_from_bytes(
                self._unary("GetTask", request, timeout=self.config.long_poll_s + self.config.rpc_timeout_s)
            ),
        )
        if poll.task is None:
            if poll.retry_after_seconds > 0:
                self._sleep(poll.retry_after_seconds)
            return None
        if poll.task.model_version != self._model_version:
            self._download_trainables(poll.task.model_version)
            if poll.task.model_version != self._model_version:
                return None  # the model moved on while downloading: ask again
        return poll.task

    @property
    def _model_version(self) -> int:
        return self._worker.version if self._worker is not None else -1

    def _train(self, task: RoundTask) -> Upload:
        """The upload for ``task``: the device worker runs the task's mode on the local data."""
        worker, dataset = self._worker, self.dataset
        if worker is None or dataset is None:
            raise ClientError("no session: the bundle was not loaded")  # unreachable after join
        return worker.run(task, dataset)

    def _submit(self, task: RoundTask, upload: Upload) -> None:
        result = upload.result.for_upload()
        method, request = serde.upload_request(self.config.device_id, Upload(result, upload.vector), task.upload_mode)
        self.stats.uplink_bytes += len(request)
        try:
            ack = self._retry("submit", lambda: serde.submit_ack_from_bytes(self._unary(method, request)))
        except grpc.RpcError as e:
            if e.code() in _DROP_RESULT:
                self.stats.dropped += 1
                log.warning("result for round %d refused (%s): %s", result.round_id, e.code().name, e.details())
                return
            raise
        self.stats.rounds += 1
        log.info("round %d submitted%s", result.round_id, " (already accepted)" if ack.duplicate else "")

    # ------------------------------------------------------------------ downloads

    def _ensure_bundle(self, sha256: str) -> None:
        target = self.bundle_dir / f"bundle-{sha256[:16]}"
        if self._bundle is not None and self._bundle.path == target:
            return
        if not (target / "manifest.json").is_file():
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            part = self.bundle_dir / "bundle.zip.part"

            def chunks_from(offset: int) -> Iterator[serde.DownloadChunk]:
                return self._stream("DownloadBundle", serde.download_request(self.config.device_id, offset))

            self._retry("download the bundle", lambda: resume_download(part, sha256, chunks_from))
            self.stats.bundle_downloads += 1
            try:
                extract_bundle(part, target)
            except UnsafeBundle as e:
                raise ClientError(str(e)) from e
            part.unlink()
        bundle = load_bundle(target)
        self._bundle = bundle
        self._session = BundleSession(bundle, self.session_options)
        # a new worker holds no tensors: the aggregator's current ones are fetched, not the bundle's initial ones
        self._worker = DeviceWorker(bundle, self._session, self.defaults)
        if self._dataset_factory is not None:
            self.dataset = self._dataset_factory(bundle)

    def _download_trainables(self, wanted: int) -> None:
        def fetch() -> tuple[int, dict[str, np.ndarray]]:
            return read_trainables(self._stream("DownloadTrainables", serde.download_request(self.config.device_id)))

        version, tensors = self._retry("download the trainables", fetch)
        self.stats.trainable_downloads += 1
        session, worker = self._session, self._worker
        if session is None or worker is None:
            raise ClientError("no session: the bundle was not loaded")
        session.check_trainables(tensors)
        worker.set_model(version, tensors)
        if version != wanted:
            log.info("asked for model version %d, the aggregator now has %d", wanted, version)

    # ------------------------------------------------------------------ transport

    def _connection(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = _channel(self.config)
        return self._channel

    def _unary(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        call = rpc.unary_call(self._connection(), method)
        reply: bytes = call(request, timeout=timeout or self.config.rpc_timeout_s, metadata=self._metadata)
        return reply

    def _stream(self, method: str, request: bytes) -> Iterator[serde.DownloadChunk]:
        call = rpc.stream_call(self._connection(), method)
        for data in call(request, timeout=max(self.config.rpc_timeout_s, 600.0), metadata=self._metadata):
            yield serde.chunk_from_bytes(data)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying transient failures with backoff; re-join if the server forgot us."""
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                floor = retry_after(e)
                if code == grpc.StatusCode.UNAUTHENTICATED and "UNKNOWN_DEVICE" in (e.details() or ""):
                    log.info("the aggregator does not know this device (restarted?); joining again")
                    self._joined = None
                    self._ensure_joined()
                elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise ClientError(f"the aggregator refused this device's token: {e.details()}") from e
                elif not is_transient(e):
                    raise
                log.info("could not %s (%s: %s); retrying", what, code.name, e.details())
            except CorruptDownload as e:
                log.warning("could not %s: %s", what, e)
                floor = 0.0
            attempt += 1
            self.stats.retries += 1
            if self.config.max_retries and attempt >= self.config.max_retries:
                raise ClientError(f"could not {what} after {attempt} attempts; is the aggregator reachable?")
            self._sleep(backoff_delay(attempt - 1, self.config, self._rng, floor))

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped


def describe(stats: ClientStats) -> str:
    return ", ".join(f"{k} {v}" for k, v in vars(stats).items())


__all__: Sequence[str] = ("ClientError", "ClientStats", "DeviceClient", "DeviceClientConfig", "backoff_delay")
