"""Wire messages <-> domain dataclasses: with ``server_codec`` and ``rpc``, the only code touching the stubs.

Encoding functions are named ``<thing>_to_proto`` / ``<thing>_from_proto`` (Flower's
``fit_ins_to_proto`` style). Decoding checks everything a peer could get wrong and raises
:class:`DecodeError` with a reason and a message that says what was wrong, so that the servicer
can answer ``INVALID_ARGUMENT`` with it and the client can refuse a bad task.

Requests arrive at the server as raw bytes (the servicer registers identity deserializers) so
that a malformed protobuf is reported as ``INVALID_ARGUMENT`` (:mod:`fwdfleet.protocol.server_codec`)
instead of a generic ``INTERNAL`` from grpc's own deserializer; :mod:`fwdfleet.protocol.rpc` routes
the Fleet methods as bytes.

Derivatives travel as float32: 4 bytes each, packed, next to packed varint indices, so a
result with K = 64 pairs is well under 1 KB. In ``dense`` and ``fedavg`` mode a device uploads one
flat vector instead (:func:`submit_vector_request` / ``server_codec.parse_submit_vector``): little-endian
float32 bytes in the manifest's canonical trainable order, with their count and sha256 checked
before anything is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError as _PbDecodeError
from google.protobuf.message import Message

from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol import PROTOCOL_VERSION
from fwdfleet.protocol.f32 import f32_bytes, sha256_hex
from fwdfleet.protocol.v1 import fleet_pb2 as pb
from fwdfleet.task import (
    DeviceProfile,
    DeviceResult,
    InvalidResultError,
    JoinInfo,
    RoundTask,
    SubmitReceipt,
    Upload,
    check_result_fields,
)

__all__ = [
    "DecodeError",
    "DeviceProfile",
    "DownloadChunk",
    "HeartbeatAck",
    "Joined",
    "ServerStatus",
    "SubmitReceipt",
    "TaskPoll",
    "UploadMode",
]

UploadMode = str  # an upload mode's name (the registries: fwdfleet.aggregator.modes, fwdfleet.device_runtime.modes)

_DISTRIBUTIONS = {"rademacher": pb.DISTRIBUTION_RADEMACHER, "gaussian": pb.DISTRIBUTION_GAUSSIAN}
_DIFFERENCES = {"central": pb.DIFFERENCE_CENTRAL, "forward": pb.DIFFERENCE_FORWARD}
# the wire's enum for the first three modes (older peers read only it); every mode also travels by name
UPLOAD_MODE_CODES = {"scalar": pb.UPLOAD_MODE_SCALAR, "dense": pb.UPLOAD_MODE_DENSE, "fedavg": pb.UPLOAD_MODE_FEDAVG}
_F32_MAX = float(np.finfo(np.float32).max)


class DecodeError(ValueError):
    """A wire message is malformed or carries values the domain refuses.

    ``reason`` is one of ``MALFORMED``, ``NON_FINITE``, ``DUPLICATE_INDEX``, ``VERSION``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- wire-level answers


@dataclass(frozen=True)
class Joined(JoinInfo):
    """The aggregator's answer to Join: the coordinator's :class:`JoinInfo` and what the server adds."""

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
        upload_mode=task.upload_mode,
        lr=task.lr,
        local_steps=task.local_steps,
        local_epochs=task.local_epochs,
        objective=task.objective,
        local_mode=task.local_mode,
    )


def task_from_proto(msg: pb.RoundTask, default_mode: UploadMode = "scalar") -> RoundTask:
    """``default_mode``: the mode of a task from an aggregator that did not name it in the task."""
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
            upload_mode=msg.upload_mode or default_mode,
            lr=msg.lr,
            local_steps=msg.local_steps,
            local_epochs=msg.local_epochs or 1,
            objective=msg.objective,
            local_mode=msg.local_mode,
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
    """Decode a device's result; what :func:`fwdfleet.task.check_result_fields` refuses (NaN/inf values,
    repeated indices, unpaired lists) is a :class:`DecodeError` with the same reason."""
    if not math.isfinite(msg.compute_seconds):
        raise DecodeError("NON_FINITE", f"result field compute_seconds is {msg.compute_seconds}; it must be finite")
    try:
        indices, derivatives = tuple(msg.indices), tuple(msg.derivatives)
        check_result_fields(indices, derivatives, msg.num_samples, msg.loss_mean, msg.loss_std)
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
    except InvalidResultError as e:
        raise DecodeError(e.reason, f"invalid result: {e}") from e


def profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    return pb.DeviceProfile(
        platform=profile.platform,
        ram_mb=profile.ram_mb,
        compute_speed=profile.compute_speed,
        labels=dict(profile.labels),
        num_samples=profile.num_samples,
    )


def profile_from_proto(msg: pb.DeviceProfile) -> DeviceProfile:
    try:
        return DeviceProfile(
            platform=msg.platform,
            ram_mb=msg.ram_mb,
            compute_speed=msg.compute_speed if msg.compute_speed else 1.0,
            labels=dict(msg.labels),
            num_samples=msg.num_samples,
        )
    except (ValueError, FwdfleetError) as e:
        raise DecodeError("MALFORMED", f"invalid device profile: {e}") from e


# --------------------------------------------------------------------------- requests (client side)


def join_request(device_id: str, profile: DeviceProfile, client_version: str) -> bytes:
    return wire_bytes(pb.JoinRequest(
        device_id=device_id,
        profile=profile_to_proto(profile),
        protocol_version=PROTOCOL_VERSION,
        client_version=client_version,
    ))


def get_task_request(device_id: str, wait_seconds: float) -> bytes:
    return wire_bytes(pb.GetTaskRequest(device_id=device_id, wait_seconds=wait_seconds))


def submit_request(device_id: str, result: DeviceResult) -> bytes:
    return wire_bytes(pb.SubmitRequest(device_id=device_id, result=result_to_proto(result)))


def upload_request(device_id: str, upload: Upload, mode: UploadMode) -> tuple[str, bytes]:
    """``(Fleet method, request bytes)`` of an upload: ``Submit`` for (k, d_k) pairs, ``SubmitVector``
    when it carries a vector."""
    if upload.vector is None:
        return "Submit", submit_request(device_id, upload.result)
    return "SubmitVector", submit_vector_request(device_id, upload.result, mode, upload.vector)


def submit_vector_request(device_id: str, result: DeviceResult, mode: UploadMode, values: np.ndarray) -> bytes:
    """A flat vector (e.g. ``mode="dense"``'s gradient, ``"fedavg"``'s trainables) with the result's metadata.

    ``values`` is the flat vector in the manifest's canonical trainable order; it travels as
    little-endian float32 bytes with its length and sha256.
    """
    if not mode:
        raise ValueError("a vector upload needs its mode's name")
    if result.indices or result.derivatives:
        raise ValueError("a vector upload's result must carry no (index, derivative) pairs")
    flat = np.asarray(values).reshape(-1)
    if flat.size and np.isfinite(flat).all() and float(np.abs(flat).max()) > _F32_MAX:
        raise ValueError("the uploaded vector holds a value too large for float32")
    data = f32_bytes(flat)
    return wire_bytes(pb.SubmitVectorRequest(
        device_id=device_id,
        result=result_to_proto(result),
        mode=UPLOAD_MODE_CODES.get(mode, pb.UPLOAD_MODE_UNSPECIFIED),
        mode_name=mode,
        values=data,
        num_values=flat.size,
        sha256=sha256_hex(data),
    ))


def heartbeat_request(device_id: str) -> bytes:
    return wire_bytes(pb.HeartbeatRequest(device_id=device_id))


def download_request(device_id: str, offset: int = 0, model_version: int = 0) -> bytes:
    return wire_bytes(pb.DownloadRequest(device_id=device_id, offset=offset, model_version=model_version))


def status_request() -> bytes:
    return wire_bytes(pb.StatusRequest())


# --------------------------------------------------------------------------- replies (client side)


def joined_from_bytes(data: bytes) -> Joined:
    m = parse_message(pb.JoinReply, data)
    return Joined(
        device_index=m.device_index,
        model_version=m.model_version,
        round_id=m.round_id,
        bundle_sha256=m.bundle_sha256,
        bundle_size=m.bundle_size,
        protocol_version=m.protocol_version,
        heartbeat_interval_seconds=m.heartbeat_interval_seconds,
        mode=upload_mode_from_proto(m.mode, "JoinReply.mode", m.mode_name),
    )


def task_poll_from_bytes(data: bytes) -> TaskPoll:
    m = parse_message(pb.GetTaskReply, data)
    mode = upload_mode_from_proto(m.mode, "GetTaskReply.mode", m.mode_name)
    if m.WhichOneof("outcome") == "task":
        return TaskPoll(task=task_from_proto(m.task, mode), model_version=m.model_version, mode=mode)
    return TaskPoll(
        task=None,
        model_version=m.model_version,
        retry_after_seconds=m.no_task.retry_after_seconds,
        reason=m.no_task.reason,
        mode=mode,
    )


def submit_ack_from_bytes(data: bytes) -> SubmitReceipt:
    m = parse_message(pb.SubmitReply, data)
    return SubmitReceipt(accepted=m.accepted, duplicate=m.duplicate, round_id=m.round_id)


def heartbeat_ack_from_bytes(data: bytes) -> HeartbeatAck:
    m = parse_message(pb.HeartbeatReply, data)
    return HeartbeatAck(model_version=m.model_version, round_id=m.round_id)


def chunk_from_bytes(data: bytes) -> DownloadChunk:
    m = parse_message(pb.Chunk, data)
    return DownloadChunk(
        offset=m.offset, data=m.data, total_size=m.total_size, sha256=m.sha256, model_version=m.model_version
    )


def status_from_bytes(data: bytes) -> ServerStatus:
    m = parse_message(pb.StatusReply, data)
    return ServerStatus(
        protocol_version=m.protocol_version,
        server_version=m.server_version,
        round_id=m.round_id,
        model_version=m.model_version,
        uptime_seconds=m.uptime_seconds,
        status_json=m.status_json or "{}",
    )


# --------------------------------------------------------------------------- helpers


def wire_bytes(msg: Message) -> bytes:
    """A message's wire bytes (typed: the generated classes are not)."""
    data: bytes = msg.SerializeToString()
    return data


_M = TypeVar("_M", bound=Message)


def parse_message(cls: Callable[[], _M], data: bytes) -> _M:
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


def upload_mode_from_proto(value: int, field_name: str, name: str = "") -> UploadMode:
    """A mode from the wire: its name when given, else the enum (unspecified: an aggregator from
    before vector uploads, so ``scalar``)."""
    if name:
        if len(name) > 64:
            raise DecodeError("MALFORMED", f"{field_name} names a mode of {len(name)} characters; the limit is 64")
        return name
    if value == pb.UPLOAD_MODE_UNSPECIFIED:
        return "scalar"
    return _enum_name(UPLOAD_MODE_CODES, value, field_name)


def need_device_id(device_id: str) -> None:
    if not device_id:
        raise DecodeError("MALFORMED", "device_id must not be empty")
    if len(device_id) > 256:
        raise DecodeError("MALFORMED", f"device_id is {len(device_id)} characters long; the limit is 256")
