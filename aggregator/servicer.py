"""The gRPC servicer: decode, call the :class:`~aggregator.coordinator.Coordinator`, encode. Thin.

Every method receives the raw request bytes, decodes them with :mod:`fwdfleet.protocol.serde`
and calls one coordinator method (the coordinator is thread-safe: it takes its own lock).
Errors become gRPC statuses in one place,
:func:`_status_for`: a malformed message or a refused value is ``INVALID_ARGUMENT``; a
:class:`~aggregator.errors.RejectedError` maps through its code's ``grpc_status``; a token used
for another device's id is ``PERMISSION_DENIED``. Every abort message says why.

Receive limits are per method: every call but ``SubmitVector`` is refused with
``RESOURCE_EXHAUSTED`` above ``max_request_bytes`` (a scalar result is well under 1 KB), while
``SubmitVector`` (dense gradients, FedAvg weights) may carry up to ``max_vector_request_bytes``;
the server sets the transport limit to the larger of the two. ``Submit`` and ``SubmitVector`` both
hand an :class:`~fwdfleet.task.Upload` to ``coordinator.submit_upload``, whose upload mode decides
what it accepts; every task, JoinReply and GetTaskReply names the coordinator's mode.

``GetTask`` is a long poll: it holds the call until a task exists for the device or the wait
ends, and at most ``long_poll_slots`` calls wait at once so that long polls never starve
``Submit`` of worker threads (a device turned away is told to retry shortly).

Downloads are flow-controlled the same way, since a stream its reader does not drain holds a
worker thread: at most ``download_slots`` streams at once over the whole server and
``downloads_per_device`` per device id, each cancelled after ``download_timeout_s`` (the device
resumes from its last byte). A stream beyond a cap is answered ``RESOURCE_EXHAUSTED`` at once,
with ``retry-after-ms`` trailing metadata; a request over a size limit is ``RESOURCE_EXHAUSTED``
marked ``fwdfleet-retry: no`` (sending it again cannot help; see :mod:`fwdfleet.protocol.retry`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from fwdfleet import __version__
from fwdfleet.aggregator.auth import UNKNOWN_TOKEN, TokenAllowList
from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.errors import RejectedError
from fwdfleet.aggregator.records import CoordinatorStatus, RoundEvent
from fwdfleet.bundle import Bundle, TensorSpec, sha256_file, zip_bundle
from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol import PROTOCOL_VERSION, loggable, serde, server_codec
from fwdfleet.protocol.retry import PERMANENT_KEY, RETRY_AFTER_KEY
from fwdfleet.task import DeviceProfile, JoinInfo, RoundTask, SubmitReceipt, Upload

log = logging.getLogger("fwdfleet.aggregator")
T = TypeVar("T")


@dataclass(frozen=True)
class ServicerSettings:
    long_poll_max_s: float = 20.0  # a GetTask call is held at most this long
    long_poll_slots: int = 8  # GetTask calls allowed to wait at once
    retry_after_s: float = 1.0  # what a device turned away from the long poll is told
    chunk_bytes: int = 1 << 20  # download chunk size (well under the client's receive limit)
    heartbeat_interval_s: float = 10.0
    max_request_bytes: int = 16 * 1024  # every call but SubmitVector
    max_vector_request_bytes: int = 16 * 1024  # SubmitVector (the server sizes it from the bundle)
    download_slots: int = 4  # download streams served at once (each holds a worker thread)
    downloads_per_device: int = 2  # download streams one device id may hold at once
    download_timeout_s: float = 300.0  # a stream still open after this is cancelled (the device resumes)
    max_devices_per_token: int = 10_000  # devices one token (a fleet-wide one) may register

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_vector_request_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"server.{name} must be >= 1 KiB, got {getattr(self, name)}")
        if not self.long_poll_max_s >= 0:
            raise ValueError(f"server.long_poll_max_s must be >= 0, got {self.long_poll_max_s}")
        if self.long_poll_slots < 1:
            raise ValueError(f"server.long_poll_slots must be >= 1, got {self.long_poll_slots}")
        if not self.retry_after_s > 0:
            raise ValueError(f"server.retry_after_s must be > 0, got {self.retry_after_s}")
        if not 1024 <= self.chunk_bytes <= 3 << 20:
            raise ValueError(f"server.chunk_bytes must be in [1 KiB, 3 MiB], got {self.chunk_bytes}")
        if not self.heartbeat_interval_s > 0:
            raise ValueError(f"server.heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.max_devices_per_token < 1:
            raise ValueError(f"server.max_devices_per_token must be >= 1, got {self.max_devices_per_token}")
        if self.download_slots < 1 or self.downloads_per_device < 1:
            raise ValueError("server.download_slots and server.downloads_per_device must be >= 1")
        if not self.download_timeout_s > 0:
            raise ValueError(f"server.download_timeout_s must be > 0, got {self.download_timeout_s}")


@dataclass(frozen=True)
class BundleArchive:
    """The bundle as one zip file on disk, with its checksum: what DownloadBundle streams."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def from_bundle(cls, bundle: Bundle, workdir: Path) -> BundleArchive:
        out = zip_bundle(bundle, workdir / "bundle.zip")
        return cls(path=out, sha256=sha256_file(out), size=out.stat().st_size)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = trailing


def _too_large(message: str) -> _Abort:
    """A request over a size limit: RESOURCE_EXHAUSTED that a retry cannot cure (so clients do not retry)."""
    return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, ((PERMANENT_KEY, "no"),))


def _status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one place where domain errors become gRPC statuses."""
    if isinstance(error, _Abort):
        return error.code, error.message
    if isinstance(error, serde.DecodeError):
        code = grpc.StatusCode.FAILED_PRECONDITION if error.reason == "VERSION" else grpc.StatusCode.INVALID_ARGUMENT
        return code, f"{error.reason}: {error}"
    if isinstance(error, RejectedError):
        return getattr(grpc.StatusCode, error.code.grpc_status), str(error)
    if isinstance(error, FwdfleetError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    log.exception("internal error in a Fleet call", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal aggregator error ({type(error).__name__}); see the server log"


class FleetCoordinator(Protocol):
    """What the servicer needs of a coordinator (:class:`~fwdfleet.aggregator.coordinator.Coordinator`
    is one); the servicer only decodes, calls these and encodes."""

    config: AggregatorConfig
    bundle: Bundle

    def join(self, device_id: str, profile: DeviceProfile, *, owner: str | None = None,
             owner_limit: int = 0) -> JoinInfo: ...

    def heartbeat(self, device_id: str) -> None: ...

    def task_for(self, device_id: str) -> RoundTask | None: ...

    def submit_upload(self, device_id: str, upload: Upload, *, mode: str | None = None) -> SubmitReceipt: ...

    def status(self) -> CoordinatorStatus: ...

    def advance(self, now: float | None = None) -> list[RoundEvent]: ...

    def current_trainables(self) -> tuple[int, dict[str, np.ndarray]]: ...


class FleetServicer:
    """Implements ``fwdfleet.v1.Fleet`` on top of a coordinator (register with ``rpc.generic_handler``)."""

    def __init__(
        self,
        coordinator: FleetCoordinator,
        archive: BundleArchive,
        *,
        allow_list: TokenAllowList | None = None,
        settings: ServicerSettings | None = None,
        trainable_specs: tuple[TensorSpec, ...] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.archive = archive
        self.allow_list = allow_list
        self.settings = settings or ServicerSettings()
        self.mode: serde.UploadMode = coordinator.config.mode
        if trainable_specs is None:
            trainable_specs = tuple(coordinator.bundle.manifest.trainables)
        self.trainable_specs = trainable_specs
        self.num_values = sum(t.size for t in trainable_specs)
        self._cache_lock = threading.Lock()  # the coordinator locks itself; this guards the npz cache
        self._changed = threading.Condition()  # notified when a round may have opened
        self._slots = threading.BoundedSemaphore(self.settings.long_poll_slots)
        self._downloads_lock = threading.Lock()
        self._downloads: dict[str, int] = {}  # open download streams by device id
        self._trainables_cache: tuple[int, bytes, str] | None = None
        self._started = time.monotonic()

    # ------------------------------------------------------------------ plumbing

    def _guard(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as e:  # mapped in one place; context.abort raises outside the try
            code, message = _status_for(e)
            if isinstance(e, _Abort) and e.trailing:
                context.set_trailing_metadata(e.trailing)
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    def _small(self, request: bytes, method: str) -> None:
        """The per-method receive limit of every call but SubmitVector (the transport's may be larger)."""
        limit = self.settings.max_request_bytes
        if len(request) > limit:
            raise _too_large(
                f"{method} request of {len(request)} bytes exceeds the {limit}-byte limit (server.max_receive_bytes)"
            )

    def _authorize(self, context: grpc.ServicerContext, device_id: str) -> None:
        if self.allow_list is None:
            return
        principal = self.allow_list.identify_metadata(context.invocation_metadata())
        if principal is None:  # revoked by a reload since the interceptor let the call in: refuse it as it would
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, UNKNOWN_TOKEN)
        if not principal.may_act_for(device_id):
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token may not act for device {device_id!r}; use the token issued for that device",
            )

    def notify(self) -> None:
        """Wake the long polls (a round may have opened)."""
        with self._changed:
            self._changed.notify_all()

    def advance(self, now: float | None = None) -> list[RoundEvent]:
        """Close/open rounds (called periodically by the server); wakes long polls on any event."""
        events = list(self.coordinator.advance(now))
        if events:
            self.notify()
        return events

    def _versions(self) -> tuple[int, int]:
        status = self.coordinator.status()
        return int(status.model_version), int(status.round_id)

    # ------------------------------------------------------------------ methods

    def Join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        def run() -> bytes:
            self._small(request, "Join")
            call = server_codec.parse_join(request)
            self._authorize(context, call.device_id)
            principal = self.allow_list.identify_metadata(context.invocation_metadata()) if self.allow_list else None
            info = self.coordinator.join(call.device_id, call.profile, owner=principal.name if principal else None,
                                         owner_limit=self.settings.max_devices_per_token)
            self.notify()
            log.info("device %s joined as index %d (%s)", loggable(call.device_id), info.device_index,
                     loggable(call.client_version))
            return server_codec.joined_to_bytes(
                serde.Joined(
                    **asdict(info),
                    bundle_sha256=self.archive.sha256,
                    bundle_size=self.archive.size,
                    protocol_version=PROTOCOL_VERSION,
                    heartbeat_interval_seconds=self.settings.heartbeat_interval_s,
                    mode=self.mode,
                )
            )

        return self._guard(context, run)

    def GetTask(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._guard(context, lambda: self._small(request, "GetTask"))
        device_id, wait = self._guard(context, lambda: server_codec.parse_get_task(request))
        self._guard(context, lambda: self._authorize(context, device_id))
        deadline = time.monotonic() + min(wait, self.settings.long_poll_max_s)
        waiting = wait > 0 and self._slots.acquire(blocking=False)
        try:
            while True:

                def poll() -> tuple[RoundTask | None, int]:
                    return self.coordinator.task_for(device_id), self._versions()[0]

                task, version = self._guard(context, poll)
                if task is not None:
                    ready = serde.TaskPoll(task=task, model_version=version, mode=self.mode)
                    return server_codec.task_poll_to_bytes(ready)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active() or (wait > 0 and not waiting):
                    busy = wait > 0 and not waiting
                    return server_codec.task_poll_to_bytes(
                        serde.TaskPoll(
                            task=None,
                            model_version=version,
                            retry_after_seconds=self.settings.retry_after_s if busy or wait == 0 else 0.0,
                            reason="server busy: too many waiting devices" if busy else "no task for you yet",
                            mode=self.mode,
                        )
                    )
                with self._changed:
                    self._changed.wait(min(remaining, 0.5))
        finally:
            if waiting:
                self._slots.release()

    def Submit(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        def run() -> bytes:
            self._small(request, "Submit")
            device_id, result = server_codec.parse_submit(request)
            self._authorize(context, device_id)
            return self._ack(self.coordinator.submit_upload(device_id, Upload(result)))

        return self._guard(context, run)

    def SubmitVector(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        def run() -> bytes:
            limit = self.settings.max_vector_request_bytes
            if len(request) > limit:
                raise _too_large(f"SubmitVector request of {len(request)} bytes exceeds the {limit}-byte limit "
                                 f"for this model ({self.num_values} trainable values)")
            call = server_codec.parse_submit_vector(request, self.num_values)
            self._authorize(context, call.device_id)
            upload = Upload(call.result, call.values)
            return self._ack(self.coordinator.submit_upload(call.device_id, upload, mode=call.mode))

        return self._guard(context, run)

    def _ack(self, receipt: SubmitReceipt) -> bytes:
        self.notify()
        return server_codec.submit_ack_to_bytes(receipt)

    def Heartbeat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        def run() -> bytes:
            self._small(request, "Heartbeat")
            device_id = server_codec.parse_heartbeat(request)
            self._authorize(context, device_id)
            self.coordinator.heartbeat(device_id)
            version, round_id = self._versions()
            return server_codec.heartbeat_ack_to_bytes(serde.HeartbeatAck(model_version=version, round_id=round_id))

        return self._guard(context, run)

    def _download_slot(self, context: grpc.ServicerContext, request: bytes, method: str) -> server_codec.DownloadCall:
        """Admit a download stream (authorized, under the global and the per-device cap) and arrange
        for its slot to be released when the call ends and for the call to be cancelled at its deadline."""
        self._small(request, method)
        call = server_codec.parse_download(request)
        self._authorize(context, call.device_id)
        s = self.settings
        busy = ((RETRY_AFTER_KEY, str(int(s.retry_after_s * 1000))),)
        with self._downloads_lock:
            if self._downloads.get(call.device_id, 0) >= s.downloads_per_device:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"device {_quote(call.device_id)} already has "
                             f"{s.downloads_per_device} downloads open (server.downloads_per_device); retry later",
                             busy)
            if sum(self._downloads.values()) >= s.download_slots:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: every download slot is taken "
                             "(server.download_slots); retry after the delay given", busy)
            self._downloads[call.device_id] = self._downloads.get(call.device_id, 0) + 1
        released = threading.Event()
        timer = threading.Timer(s.download_timeout_s, context.cancel)  # unblocks a stream nobody reads

        def release() -> None:
            timer.cancel()
            with self._downloads_lock:
                if released.is_set():
                    return
                released.set()
                left = self._downloads.get(call.device_id, 1) - 1
                if left > 0:
                    self._downloads[call.device_id] = left
                else:
                    self._downloads.pop(call.device_id, None)

        if not context.add_callback(release):  # the call already ended
            release()
        else:
            timer.daemon = True
            timer.start()
        return call

    def DownloadBundle(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._guard(context, lambda: self._download_slot(context, request, "DownloadBundle"))
        if call.offset > self.archive.size:
            self._guard(context, lambda: _raise_offset(call.offset, self.archive.size))
        with open(self.archive.path, "rb") as f:
            f.seek(call.offset)
            yield from self._chunks(f, call.offset, self.archive.size, self.archive.sha256, 0)

    def DownloadTrainables(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._guard(context, lambda: self._download_slot(context, request, "DownloadTrainables"))
        version, data, digest = self._guard(context, self._trainables_npz)
        if call.offset and call.model_version != version:
            context.abort(
                grpc.StatusCode.ABORTED,
                f"model version changed from {call.model_version} to {version} during the download; "
                "restart it from offset 0",
            )
        if call.offset > len(data):
            self._guard(context, lambda: _raise_offset(call.offset, len(data)))
        yield from self._chunks(io.BytesIO(data[call.offset :]), call.offset, len(data), digest, version)

    def Status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        def run() -> bytes:
            self._small(request, "Status")
            server_codec.parse_status(request)
            status = self.coordinator.status()
            body = asdict(status)
            return server_codec.status_to_bytes(
                serde.ServerStatus(
                    protocol_version=PROTOCOL_VERSION,
                    server_version=__version__,
                    round_id=int(body.get("round_id", 0)),
                    model_version=int(body.get("model_version", 0)),
                    uptime_seconds=time.monotonic() - self._started,
                    status_json=json.dumps(body, default=str, sort_keys=True),
                )
            )

        return self._guard(context, run)

    # ------------------------------------------------------------------ helpers

    def _chunks(self, f: Any, offset: int, total: int, digest: str, version: int) -> Iterator[bytes]:
        while True:
            data = f.read(self.settings.chunk_bytes)
            if not data:
                return
            yield server_codec.chunk_to_bytes(
                serde.DownloadChunk(offset=offset, data=data, total_size=total, sha256=digest, model_version=version)
            )
            offset += len(data)

    def _trainables_npz(self) -> tuple[int, bytes, str]:
        with self._cache_lock:
            version, tensors = self.coordinator.current_trainables()
            cached = self._trainables_cache
            if cached is not None and cached[0] == version:
                return cached
            buf = io.BytesIO()
            arrays: dict[str, Any] = {name: np.ascontiguousarray(v) for name, v in tensors.items()}
            np.savez(buf, **arrays)
            data = buf.getvalue()
            self._trainables_cache = (int(version), data, hashlib.sha256(data).hexdigest())
            return self._trainables_cache


def _raise_offset(offset: int, size: int) -> None:
    raise _Abort(grpc.StatusCode.OUT_OF_RANGE, f"download offset {offset} is beyond the file's {size} bytes")


def _quote(text: str) -> str:
    return repr(loggable(text))
