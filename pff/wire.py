"""PFF store messages <-> domain values: the only module that touches ``pff_pb2``.

Every request and reply of ``service PffStore`` is built and read here, and the service is bound
to its gRPC stubs here (:func:`add_store_servicer`, :class:`StoreStub`); :mod:`pff.store` works
with domain values only. A tensor travels in the codec both services share
(:mod:`fwdfleet.protocol.f32`: raw little-endian float32 bytes, shape, sha256); decoding
checks the size against the shape, the digest, and that every value is finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import grpc
import numpy as np

from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol.f32 import EncodedTensor, TensorError, check_encoded, encode_tensors
from fwdfleet.protocol.v1 import pff_pb2 as pb
from fwdfleet.protocol.v1 import pff_pb2_grpc as pb_grpc

Params = dict[str, np.ndarray]


class StoreError(FwdfleetError):
    """The parameter store refused a request or holds data that fails its checks."""


@dataclass(frozen=True)
class TaskRecord:
    """When and how a layer version was made (one row of the timeline)."""

    node_id: str = ""
    layer: int = 0
    chapter: int = 0
    start: float = 0.0
    end: float = 0.0
    wait_seconds: float = 0.0
    input_seconds: float = 0.0
    train_seconds: float = 0.0
    loss: float = 0.0
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Progress:
    """A node's last progress report."""

    node_id: str
    state: str = "starting"
    layer: int = 0
    chapter: int = 0
    step: int = 0
    total_steps: int = 0
    tasks_done: int = 0
    tasks_total: int = 0
    time: float = 0.0


def check_stored(t: EncodedTensor) -> EncodedTensor:
    """``t`` once its size, sha256 and finite values are checked (no copy into an array)."""
    try:
        return check_encoded(t)
    except TensorError as e:
        raise StoreError(f"{e}; if the values are not finite, the layer diverged: lower --lr") from e


def encoded_from_proto(msgs: Iterable[pb.Tensor]) -> list[EncodedTensor]:
    """Received tensors, checked (unique names, size, sha256, finite values) but not copied into arrays."""
    out: list[EncodedTensor] = []
    for t in msgs:
        if not t.name or any(e.name == t.name for e in out):
            raise StoreError(f"tensor names must be unique and non-empty, got {t.name!r}")
        out.append(check_stored(EncodedTensor(t.name, tuple(int(d) for d in t.shape), t.data, t.sha256)))
    return out


def encoded_to_proto(tensors: Iterable[EncodedTensor]) -> list[pb.Tensor]:
    return [pb.Tensor(name=t.name, shape=list(t.shape), data=t.data, sha256=t.sha256) for t in tensors]


def tensors_from_proto(msgs: Iterable[pb.Tensor]) -> Params:
    return {t.name: t.array().astype(np.float32) for t in encoded_from_proto(msgs)}


def record_to_proto(r: TaskRecord) -> pb.TaskRecord:
    return pb.TaskRecord(**r.to_dict())


def record_from_proto(m: pb.TaskRecord) -> TaskRecord:
    return TaskRecord(**{f.name: getattr(m, f.name) for f in fields(TaskRecord)})


def progress_to_proto(p: Progress) -> pb.ProgressReport:
    return pb.ProgressReport(**asdict(p))


def progress_from_proto(m: pb.ProgressReport) -> Progress:
    return Progress(**{f.name: getattr(m, f.name) for f in fields(Progress)})


# --------------------------------------------------------------------------- the service


PublishedEntry = tuple[int, int, TaskRecord]  # (layer, version, record)


class StoredVersion(Protocol):
    """A published layer version as the store holds it: its tensors (checked) and task record."""

    @property
    def tensors(self) -> list[EncodedTensor]: ...
    @property
    def record(self) -> TaskRecord: ...


class StoreBackend(Protocol):
    """What the service calls (:class:`pff.store.ParameterStore`)."""

    def publish_encoded(self, layer: int, version: int, tensors: list[EncodedTensor], record: TaskRecord) -> bool: ...
    def fetch_encoded(self, layer: int, version: int, wait_seconds: float = 0.0) -> StoredVersion | None: ...
    def report(self, progress: Progress) -> None: ...
    def status(self) -> tuple[list[PublishedEntry], list[Progress]]: ...


class _Servicer(pb_grpc.PffStoreServicer):
    """Thin: decode, call the store, map its errors to status codes."""

    def __init__(self, store: StoreBackend) -> None:
        self.store = store

    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishReply:
        try:
            tensors, record = encoded_from_proto(request.tensors), record_from_proto(request.record)
        except (StoreError, TypeError, ValueError) as e:  # a malformed message: its sender must fix it
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            dup = self.store.publish_encoded(request.layer, request.version, tensors, record)
        except StoreError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.PublishReply(duplicate=dup)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> pb.FetchReply:
        stored = self.store.fetch_encoded(request.layer, request.version, request.wait_seconds)
        if stored is None:
            return pb.FetchReply(found=False)
        return pb.FetchReply(found=True, tensors=encoded_to_proto(stored.tensors),
                             record=record_to_proto(stored.record))

    def Report(self, request: pb.ProgressReport, context: grpc.ServicerContext) -> pb.ReportReply:
        self.store.report(progress_from_proto(request))
        return pb.ReportReply()

    def Status(self, request: pb.PffStatusRequest, context: grpc.ServicerContext) -> pb.PffStatus:
        published, nodes = self.store.status()
        return pb.PffStatus(
            published=[pb.Published(layer=la, version=v, record=record_to_proto(r)) for la, v, r in published],
            nodes=[progress_to_proto(p) for p in nodes])


def _serialize(reply: Any) -> bytes:
    data: bytes = reply.SerializeToString()
    return data


_STORE_METHODS = {"Publish": (pb.PublishRequest, pb.PublishReply), "Fetch": (pb.FetchRequest, pb.FetchReply),
                  "Report": (pb.ProgressReport, pb.ReportReply), "Status": (pb.PffStatusRequest, pb.PffStatus)}


def _decoding(method: Any, request_type: Any) -> Any:
    """``method`` fed a request it decodes itself, so that bytes that do not parse are answered
    INVALID_ARGUMENT saying so (grpc's own deserializer answers INTERNAL)."""

    def handle(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = request_type.FromString(data)
        except Exception as e:  # protobuf raises DecodeError, and RuntimeWarning-like errors on odd input
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is not a valid {request_type.DESCRIPTOR.name} message ({e})")
        return method(request, context)

    return handle


def add_store_servicer(server: grpc.Server, store: StoreBackend) -> None:
    """Serve ``store`` as ``service PffStore`` on ``server`` (requests decoded by the handlers)."""
    servicer = _Servicer(store)
    handlers = {name: grpc.unary_unary_rpc_method_handler(_decoding(getattr(servicer, name), req),
                                                          response_serializer=_serialize)
                for name, (req, _reply) in _STORE_METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fwdfleet.v1.PffStore", handlers),))


class StoreStub:
    """The store's four calls on a channel, in domain values (the caller adds its retry policy)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = pb_grpc.PffStoreStub(channel)  # type: ignore[no-untyped-call]

    def publish(self, layer: int, version: int, params: Mapping[str, np.ndarray], record: TaskRecord,
                timeout: float) -> bool:
        req = pb.PublishRequest(layer=layer, version=version, tensors=encoded_to_proto(encode_tensors(params)),
                                record=record_to_proto(record))
        reply: pb.PublishReply = self._stub.Publish(req, timeout=timeout)
        return bool(reply.duplicate)

    def fetch(self, layer: int, version: int, wait_seconds: float, timeout: float) -> tuple[Params, TaskRecord] | None:
        reply: pb.FetchReply = self._stub.Fetch(
            pb.FetchRequest(layer=layer, version=version, wait_seconds=wait_seconds), timeout=timeout)
        if not reply.found:
            return None
        return tensors_from_proto(reply.tensors), record_from_proto(reply.record)

    def report(self, progress: Progress, timeout: float) -> None:
        self._stub.Report(progress_to_proto(progress), timeout=timeout)

    def status(self, timeout: float) -> tuple[list[PublishedEntry], list[Progress]]:
        reply: pb.PffStatus = self._stub.Status(pb.PffStatusRequest(), timeout=timeout)
        return ([(p.layer, p.version, record_from_proto(p.record)) for p in reply.published],
                [progress_from_proto(n) for n in reply.nodes])
