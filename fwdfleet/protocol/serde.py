"""Wire messages <-> domain dataclasses: the only module that touches the generated classes.

Encoding functions are named ``<thing>_to_proto`` / ``<thing>_from_proto`` (Flower's
``fit_ins_to_proto`` style). Decoding checks everything a peer could get wrong and raises
:class:`DecodeError` with a reason and a message that says what was wrong, so that the servicer
can answer ``INVALID_ARGUMENT`` with it and the client can refuse a bad task.

Requests arrive at the server as raw bytes (the servicer registers identity deserializers) so
that a malformed protobuf is reported as ``INVALID_ARGUMENT`` by :func:`parse_request` instead of
a generic ``INTERNAL`` from grpc's own deserializer.

Derivatives travel as float32: 4 bytes each, packed, next to packed varint indices, so a
result with K = 64 pairs is well under 1 KB. In ``dense`` and ``fedavg`` mode a device uploads one
flat vector instead (:func:`submit_vector_request` / :func:`parse_submit_vector`): little-endian
float32 bytes in the manifest's canonical trainable order, with their count and sha256 checked
before anything is decoded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError as _PbDecodeError
from google.protobuf.message import Message

from device_runtime.task import DeviceProfile, DeviceResult, RoundTask
from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol import PROTOCOL_VERSION, SERVICE_NAME
from fwdfleet.protocol.v1 import fleet_pb2 as pb
from fwdfleet.protocol.v1 import fleet_pb2_grpc as pb_grpc

__all__ = [
    "DecodeError",
    "DeviceProfile",
    "DownloadChunk",
    "HeartbeatAck",
    "Joined",
    "ServerStatus",
    "SubmitAck",
    "TaskPoll",
    "UploadMode",
    "VectorCall",
]

UploadMode = Literal["scalar", "dense", "fedavg"]
UPLOAD_MODES: tuple[UploadMode, ...] = ("scalar", "dense", "fedavg")
VECTOR_MODES: tuple[UploadMode, ...] = ("dense", "fedavg")

_DISTRIBUTIONS = {"rademacher": pb.DISTRIBUTION_RADEMACHER, "gaussian": pb.DISTRIBUTION_GAUSSIAN}
_DIFFERENCES = {"central": pb.DIFFERENCE_CENTRAL, "forward": pb.DIFFERENCE_FORWARD}
_UPLOAD_MODES = {"scalar": pb.UPLOAD_MODE_SCALAR, "dense": pb.UPLOAD_MODE_DENSE, "fedavg": pb.UPLOAD_MODE_FEDAVG}
_F32_MAX = float(np.finfo(np.float32).max)
_LE_F32 = np.dtype("<f4")


class DecodeError(ValueError):
    """A wire message is malformed or carries values the domain refuses.

    ``reason`` is one of ``MALFORMED``, ``NON_FINITE``, ``DUPLICATE_INDEX``, ``VERSION``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- wire-level answers


@dataclass(frozen=True)
class Joined:
    """The aggregator's answer to Join."""

    device_index: int
    model_version: int
    round_id: int
    bundle_sha256: str
    bundle_size: int
    protocol_version: int = PROTOCOL_VERSION
    heartbeat_interval_seconds: float = 10.0
    mode: UploadMode = "scalar"


@dataclass(frozen=True)
class TaskPoll:
    """The answer to GetTask: a task, or none and when to ask again."""

    task: RoundTask | None
    model_version: int
    retry_after_seconds: float = 0.0
    reason: str = ""
    mode: UploadMode = "scalar"  # what to upload for the task (Submit for scalar, SubmitVector otherwise)


@dataclass(frozen=True)
class SubmitAck:
    accepted: bool
    duplicate: bool
    round_id: int


@dataclass(frozen=True)
class HeartbeatAck:
    model_version: int
    round_id: int


@dataclass(frozen=True)
class DownloadChunk:
    offset: int
    data: bytes
    total_size: int
    sha256: str
    model_version: int = 0


@dataclass(frozen=True)
class ServerStatus:
    protocol_version: int
    server_version: str
    round_id: int
    model_version: int
    uptime_seconds: float
    status_json: str = "{}"
    extra: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- domain <-> proto


def task_to_proto(task: RoundTask) -> pb.RoundTask:
    return pb.RoundTask(
        round_id=task.round_id,
        model_version=task.model_version,
        round_seed=task.round_seed,
        device_index=task.device_index,
        num_perturbations=task.num_perturbations,
        eps=task.eps,
        k_start=task.k_start,
        distribution=_DISTRIBUTIONS[task.distribution],
        difference=_DIFFERENCES[task.difference],
        candidate_ratio=task.candidate_ratio,
        batch_size=task.batch_size,
        data_seed=task.data_seed,
        deadline_unix=task.deadline_unix,
    )


def task_from_proto(msg: pb.RoundTask) -> RoundTask:
    distribution = _enum_name(_DISTRIBUTIONS, msg.distribution, "RoundTask.distribution")
    difference = _enum_name(_DIFFERENCES, msg.difference, "RoundTask.difference")
    try:
        return RoundTask(
            round_id=msg.round_id,
            model_version=msg.model_version,
            round_seed=msg.round_seed,
            device_index=msg.device_index,
            num_perturbations=msg.num_perturbations,
            eps=msg.eps,
            k_start=msg.k_start,
            distribution=distribution,  # type: ignore[arg-type]
            difference=difference,  # type: ignore[arg-type]
            candidate_ratio=msg.candidate_ratio,
            batch_size=msg.batch_size,
            data_seed=msg.data_seed,
            deadline_unix=msg.deadline_unix,
        )
    except ValueError as e:
        raise DecodeError("MALFORMED", f"invalid round task: {e}") from e


def result_to_proto(result: DeviceResult) -> pb.DeviceResult:
    for name, value in (("loss_mean", result.loss_mean), ("loss_std", result.loss_std)):
        if math.isfinite(value) and abs(value) > _F32_MAX:
            raise ValueError(f"DeviceResult.{name}={value} does not fit in float32")
    derivatives = np.asarray(result.derivatives, dtype=np.float64)
    if derivatives.size and float(np.abs(derivatives).max()) > _F32_MAX:
        raise ValueError("DeviceResult.derivatives holds a value too large for float32; lower eps or the lr")
    return pb.DeviceResult(
        round_id=result.round_id,
        model_version=result.model_version,
        indices=result.indices,
        derivatives=derivatives.astype(np.float32).tolist(),
        num_samples=result.num_samples,
        loss_mean=result.loss_mean,
        loss_std=result.loss_std,
        skipped=result.skipped,
        compute_seconds=result.compute_seconds,
        extras=dict(result.extras),
    )


def result_from_proto(msg: pb.DeviceResult) -> DeviceResult:
    """Decode a device's result; NaN/inf values and repeated indices are refused with their position."""
    indices = tuple(msg.indices)
    derivatives = tuple(msg.derivatives)
    if len(indices) != len(derivatives):
        raise DecodeError(
            "MALFORMED", f"result has {len(indices)} indices but {len(derivatives)} derivatives; they must pair up"
        )
    for i, d in enumerate(derivatives):
        if not math.isfinite(d):
            raise DecodeError(
                "NON_FINITE",
                f"derivative {i} (perturbation index {indices[i]}) is {d}; skip NaN/inf perturbations "
                "and list them in `skipped` instead of uploading them",
            )
    seen: set[int] = set()
    for k in indices:
        if k in seen:
            raise DecodeError("DUPLICATE_INDEX", f"perturbation index {k} appears more than once in the result")
        seen.add(k)
    for name in ("loss_mean", "loss_std", "compute_seconds"):
        if not math.isfinite(getattr(msg, name)):
            raise DecodeError("NON_FINITE", f"result field {name} is {getattr(msg, name)}; it must be finite")
    try:
        return DeviceResult(
            round_id=msg.round_id,
            model_version=msg.model_version,
            indices=indices,
            derivatives=derivatives,
            num_samples=msg.num_samples,
            loss_mean=msg.loss_mean,
            loss_std=msg.loss_std,
            skipped=tuple(msg.skipped),
            compute_seconds=msg.compute_seconds,
            extras=dict(msg.extras),
        )
    except ValueError as e:
        raise DecodeError("MALFORMED", f"invalid result: {e}") from e


def profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    return pb.DeviceProfile(
        platform=profile.platform,
        ram_mb=profile.ram_mb,
        compute_speed=profile.compute_speed,
        labels=dict(profile.labels),
    )


def profile_from_proto(msg: pb.DeviceProfile) -> DeviceProfile:
    try:
        return DeviceProfile(
            platform=msg.platform,
            ram_mb=msg.ram_mb,
            compute_speed=msg.compute_speed if msg.compute_speed else 1.0,
            labels=dict(msg.labels),
        )
    except (ValueError, FwdfleetError) as e:
        raise DecodeError("MALFORMED", f"invalid device profile: {e}") from e


# --------------------------------------------------------------------------- requests (client side)


def join_request(device_id: str, profile: DeviceProfile, client_version: str) -> bytes:
    return pb.JoinRequest(
        device_id=device_id,
        profile=profile_to_proto(profile),
        protocol_version=PROTOCOL_VERSION,
        client_version=client_version,
    ).SerializeToString()


def get_task_request(device_id: str, wait_seconds: float) -> bytes:
    return pb.GetTaskRequest(device_id=device_id, wait_seconds=wait_seconds).SerializeToString()


def submit_request(device_id: str, result: DeviceResult) -> bytes:
    return pb.SubmitRequest(device_id=device_id, result=result_to_proto(result)).SerializeToString()


def submit_vector_request(device_id: str, result: DeviceResult, mode: UploadMode, values: np.ndarray) -> bytes:
    """A dense gradient (``mode="dense"``) or flat trainables (``"fedavg"``) with the result's metadata.

    ``values`` is the flat vector in the manifest's canonical trainable order; it travels as
    little-endian float32 bytes with its length and sha256.
    """
    if mode not in VECTOR_MODES:
        raise ValueError(f"a vector upload's mode must be one of {VECTOR_MODES}, got {mode!r}")
    if result.indices or result.derivatives:
        raise ValueError("a vector upload's result must carry no (index, derivative) pairs")
    flat = np.asarray(values).reshape(-1)
    if flat.size and np.isfinite(flat).all() and float(np.abs(flat).max()) > _F32_MAX:
        raise ValueError("the uploaded vector holds a value too large for float32")
    data = flat.astype(_LE_F32).tobytes()
    return pb.SubmitVectorRequest(
        device_id=device_id,
        result=result_to_proto(result),
        mode=_UPLOAD_MODES[mode],
        values=data,
        num_values=flat.size,
        sha256=hashlib.sha256(data).hexdigest(),
    ).SerializeToString()


def heartbeat_request(device_id: str) -> bytes:
    return pb.HeartbeatRequest(device_id=device_id).SerializeToString()


def download_request(device_id: str, offset: int = 0, model_version: int = 0) -> bytes:
    return pb.DownloadRequest(device_id=device_id, offset=offset, model_version=model_version).SerializeToString()


def status_request() -> bytes:
    return pb.StatusRequest().SerializeToString()


# --------------------------------------------------------------------------- replies (client side)


def joined_from_bytes(data: bytes) -> Joined:
    m = _parse(pb.JoinReply, data)
    return Joined(
        device_index=m.device_index,
        model_version=m.model_version,
        round_id=m.round_id,
        bundle_sha256=m.bundle_sha256,
        bundle_size=m.bundle_size,
        protocol_version=m.protocol_version,
        heartbeat_interval_seconds=m.heartbeat_interval_seconds,
        mode=_upload_mode(m.mode, "JoinReply.mode"),
    )


def task_poll_from_bytes(data: bytes) -> TaskPoll:
    m = _parse(pb.GetTaskReply, data)
    mode = _upload_mode(m.mode, "GetTaskReply.mode")
    if m.WhichOneof("outcome") == "task":
        return TaskPoll(task=task_from_proto(m.task), model_version=m.model_version, mode=mode)
    return TaskPoll(
        task=None,
        model_version=m.model_version,
        retry_after_seconds=m.no_task.retry_after_seconds,
        reason=m.no_task.reason,
        mode=mode,
    )


def submit_ack_from_bytes(data: bytes) -> SubmitAck:
    m = _parse(pb.SubmitReply, data)
    return SubmitAck(accepted=m.accepted, duplicate=m.duplicate, round_id=m.round_id)


def heartbeat_ack_from_bytes(data: bytes) -> HeartbeatAck:
    m = _parse(pb.HeartbeatReply, data)
    return HeartbeatAck(model_version=m.model_version, round_id=m.round_id)


def chunk_from_bytes(data: bytes) -> DownloadChunk:
    m = _parse(pb.Chunk, data)
    return DownloadChunk(
        offset=m.offset, data=m.data, total_size=m.total_size, sha256=m.sha256, model_version=m.model_version
    )


def status_from_bytes(data: bytes) -> ServerStatus:
    m = _parse(pb.StatusReply, data)
    return ServerStatus(
        protocol_version=m.protocol_version,
        server_version=m.server_version,
        round_id=m.round_id,
        model_version=m.model_version,
        uptime_seconds=m.uptime_seconds,
        status_json=m.status_json or "{}",
    )


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class JoinCall:
    device_id: str
    profile: DeviceProfile
    protocol_version: int
    client_version: str


@dataclass(frozen=True)
class DownloadCall:
    device_id: str
    offset: int
    model_version: int


def parse_join(data: bytes) -> JoinCall:
    m = _parse(pb.JoinRequest, data)
    _need_device_id(m.device_id)
    if m.protocol_version != PROTOCOL_VERSION:
        raise DecodeError(
            "VERSION",
            f"device speaks protocol version {m.protocol_version} but this aggregator speaks "
            f"{PROTOCOL_VERSION}; install a matching fwdfleet on the device",
        )
    return JoinCall(m.device_id, profile_from_proto(m.profile), m.protocol_version, m.client_version)


def parse_get_task(data: bytes) -> tuple[str, float]:
    m = _parse(pb.GetTaskRequest, data)
    _need_device_id(m.device_id)
    if not math.isfinite(m.wait_seconds) or m.wait_seconds < 0:
        raise DecodeError("MALFORMED", f"wait_seconds must be a non-negative number, got {m.wait_seconds}")
    return m.device_id, m.wait_seconds


def parse_submit(data: bytes) -> tuple[str, DeviceResult]:
    m = _parse(pb.SubmitRequest, data)
    _need_device_id(m.device_id)
    if not m.HasField("result"):
        raise DecodeError("MALFORMED", "submit request carries no result")
    return m.device_id, result_from_proto(m.result)


@dataclass(frozen=True)
class VectorCall:
    device_id: str
    result: DeviceResult
    mode: UploadMode  # "dense" or "fedavg"
    values: np.ndarray  # float32, shape (num_values,)


def parse_submit_vector(data: bytes, num_values: int) -> VectorCall:
    """Decode a vector upload for a model of ``num_values`` trainable values.

    The count, the byte length and the sha256 are checked before the values are decoded; a
    mismatch is ``MALFORMED`` with the numbers that disagree. Finiteness and magnitude are the
    coordinator's checks (they hold for in-process uploads too).
    """
    m = _parse(pb.SubmitVectorRequest, data)
    _need_device_id(m.device_id)
    if not m.HasField("result"):
        raise DecodeError("MALFORMED", "vector upload carries no result")
    mode = _upload_mode(m.mode, "SubmitVectorRequest.mode")
    if mode not in VECTOR_MODES:
        raise DecodeError("MALFORMED", f"SubmitVectorRequest.mode must be one of {VECTOR_MODES}, got {mode!r}; "
                          "scalar results go through Submit")
    if m.num_values != num_values or len(m.values) != 4 * num_values:
        raise DecodeError(
            "MALFORMED",
            f"vector upload declares {m.num_values} values in {len(m.values)} bytes but this model has "
            f"{num_values} trainable values ({4 * num_values} bytes of float32); the device runs another bundle",
        )
    digest = hashlib.sha256(m.values).hexdigest()
    if digest != m.sha256.lower():
        raise DecodeError("MALFORMED", f"vector upload has sha256 {digest[:12]}... but declares "
                          f"{m.sha256[:12]!r}...; the upload was corrupted, send it again")
    if len(m.result.indices) or len(m.result.derivatives):
        raise DecodeError("MALFORMED", "a vector upload's result must carry no (index, derivative) pairs")
    values = np.frombuffer(m.values, dtype=_LE_F32).astype(np.float32)
    return VectorCall(m.device_id, result_from_proto(m.result), mode, values)


def parse_heartbeat(data: bytes) -> str:
    m = _parse(pb.HeartbeatRequest, data)
    _need_device_id(m.device_id)
    return m.device_id


def parse_download(data: bytes) -> DownloadCall:
    m = _parse(pb.DownloadRequest, data)
    return DownloadCall(m.device_id, m.offset, m.model_version)


def parse_status(data: bytes) -> None:
    _parse(pb.StatusRequest, data)


def joined_to_bytes(j: Joined) -> bytes:
    return pb.JoinReply(
        device_index=j.device_index,
        model_version=j.model_version,
        round_id=j.round_id,
        bundle_sha256=j.bundle_sha256,
        bundle_size=j.bundle_size,
        protocol_version=j.protocol_version,
        heartbeat_interval_seconds=j.heartbeat_interval_seconds,
        mode=_UPLOAD_MODES[j.mode],
    ).SerializeToString()


def task_poll_to_bytes(poll: TaskPoll) -> bytes:
    mode = _UPLOAD_MODES[poll.mode]
    if poll.task is not None:
        return pb.GetTaskReply(
            task=task_to_proto(poll.task), model_version=poll.model_version, mode=mode
        ).SerializeToString()
    no_task = pb.NoTask(retry_after_seconds=poll.retry_after_seconds, reason=poll.reason)
    return pb.GetTaskReply(no_task=no_task, model_version=poll.model_version, mode=mode).SerializeToString()


def submit_ack_to_bytes(ack: SubmitAck) -> bytes:
    return pb.SubmitReply(accepted=ack.accepted, duplicate=ack.duplicate, round_id=ack.round_id).SerializeToString()


def heartbeat_ack_to_bytes(ack: HeartbeatAck) -> bytes:
    return pb.HeartbeatReply(model_version=ack.model_version, round_id=ack.round_id).SerializeToString()


def chunk_to_bytes(c: DownloadChunk) -> bytes:
    return pb.Chunk(
        offset=c.offset, data=c.data, total_size=c.total_size, sha256=c.sha256, model_version=c.model_version
    ).SerializeToString()


def status_to_bytes(s: ServerStatus) -> bytes:
    return pb.StatusReply(
        protocol_version=s.protocol_version,
        server_version=s.server_version,
        round_id=s.round_id,
        model_version=s.model_version,
        uptime_seconds=s.uptime_seconds,
        status_json=s.status_json,
    ).SerializeToString()


# Method name -> (request streaming?, response streaming?). Mirrors `service Fleet` in the proto.
METHODS: dict[str, tuple[bool, bool]] = {
    "Join": (False, False),
    "GetTask": (False, False),
    "Submit": (False, False),
    "Heartbeat": (False, False),
    "DownloadBundle": (False, True),
    "DownloadTrainables": (False, True),
    "Status": (False, False),
    "SubmitVector": (False, False),
}


def method_path(name: str) -> str:
    """The full gRPC method path, e.g. ``/fwdfleet.v1.Fleet/Submit``."""
    if name not in METHODS:
        raise KeyError(f"unknown Fleet method {name!r}")
    return f"/{SERVICE_NAME}/{name}"


def generic_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """A handler routing every Fleet method to ``servicer.<Method>(request_bytes, context)``.

    Requests are passed as bytes (no grpc-side deserialization) and replies are bytes too,
    so every encode/decode step goes through this module.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, (_, streaming) in METHODS.items():
        fn = getattr(servicer, name)
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(fn)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _identity(x: bytes) -> bytes:
    return x


def unary_call(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    """A bytes-in/bytes-out callable for a unary Fleet method on ``channel``."""
    return channel.unary_unary(method_path(name), request_serializer=_identity, response_deserializer=_identity)


def stream_call(channel: grpc.Channel, name: str) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(method_path(name), request_serializer=_identity, response_deserializer=_identity)


def check_service_matches_stubs() -> None:
    """Fail loudly if ``METHODS`` and the generated service descriptor disagree (tested)."""
    service = pb.DESCRIPTOR.services_by_name["Fleet"]
    generated = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    if generated != METHODS:
        raise RuntimeError(f"serde.METHODS {METHODS} does not match the generated service {generated}")
    if not hasattr(pb_grpc, "FleetServicer"):
        raise RuntimeError("generated fleet_pb2_grpc has no FleetServicer; regenerate the stubs")


# --------------------------------------------------------------------------- helpers

_M = TypeVar("_M", bound=Message)


def _parse(cls: Callable[[], _M], data: bytes) -> _M:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (_PbDecodeError, RuntimeError, ValueError) as e:
        name = type(msg).DESCRIPTOR.full_name
        raise DecodeError("MALFORMED", f"bytes are not a valid {name} message ({e})") from e
    return msg


def _enum_name(table: Mapping[str, int], value: int, field_name: str) -> str:
    for name, v in table.items():
        if v == value:
            return name
    raise DecodeError("MALFORMED", f"{field_name} has unknown value {value}; expected one of {sorted(table)}")


def _upload_mode(value: int, field_name: str) -> UploadMode:
    if value == pb.UPLOAD_MODE_UNSPECIFIED:
        return "scalar"  # an aggregator from before vector uploads
    return _enum_name(_UPLOAD_MODES, value, field_name)  # type: ignore[return-value]


def _need_device_id(device_id: str) -> None:
    if not device_id:
        raise DecodeError("MALFORMED", "device_id must not be empty")
    if len(device_id) > 256:
        raise DecodeError("MALFORMED", f"device_id is {len(device_id)} characters long; the limit is 256")
