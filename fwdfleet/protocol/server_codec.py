"""The aggregator's side of the wire: requests (bytes) in, checked domain values out, replies out.

Every parser raises :class:`fwdfleet.protocol.serde.DecodeError` with a reason and a message that
says what was wrong, which the servicer turns into ``INVALID_ARGUMENT``. The device's side (its
requests and the decoding of replies) and the shared message codecs are in
:mod:`fwdfleet.protocol.serde`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fwdfleet.protocol import PROTOCOL_VERSION
from fwdfleet.protocol.f32 import TensorError, decode_tensor
from fwdfleet.protocol.serde import (
    UPLOAD_MODE_CODES,
    DecodeError,
    DownloadChunk,
    HeartbeatAck,
    Joined,
    ServerStatus,
    SubmitReceipt,
    TaskPoll,
    UploadMode,
    need_device_id,
    parse_message,
    profile_from_proto,
    result_from_proto,
    task_to_proto,
    upload_mode_from_proto,
    wire_bytes,
)
from fwdfleet.protocol.v1 import fleet_pb2 as pb
from fwdfleet.task import DeviceProfile, DeviceResult


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
    m = parse_message(pb.JoinRequest, data)
    need_device_id(m.device_id)
    if m.protocol_version != PROTOCOL_VERSION:
        raise DecodeError(
            "VERSION",
            f"device speaks protocol version {m.protocol_version} but this aggregator speaks "
            f"{PROTOCOL_VERSION}; install a matching fwdfleet on the device",
        )
    return JoinCall(m.device_id, profile_from_proto(m.profile), m.protocol_version, m.client_version)


def parse_get_task(data: bytes) -> tuple[str, float]:
    m = parse_message(pb.GetTaskRequest, data)
    need_device_id(m.device_id)
    if not math.isfinite(m.wait_seconds) or m.wait_seconds < 0:
        raise DecodeError("MALFORMED", f"wait_seconds must be a non-negative number, got {m.wait_seconds}")
    return m.device_id, m.wait_seconds


def parse_submit(data: bytes) -> tuple[str, DeviceResult]:
    m = parse_message(pb.SubmitRequest, data)
    need_device_id(m.device_id)
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
    m = parse_message(pb.SubmitVectorRequest, data)
    need_device_id(m.device_id)
    if not m.HasField("result"):
        raise DecodeError("MALFORMED", "vector upload carries no result")
    mode = upload_mode_from_proto(m.mode, "SubmitVectorRequest.mode", m.mode_name)
    if m.num_values != num_values:
        raise DecodeError(
            "MALFORMED",
            f"vector upload declares {m.num_values} values but this model has {num_values} trainable values; "
            "the device runs another bundle",
        )
    try:  # finiteness and magnitude are the coordinator's checks
        values = decode_tensor("SubmitVectorRequest.values", (num_values,), m.values, m.sha256, finite=False)
    except TensorError as e:
        raise DecodeError("MALFORMED", f"vector upload: {e}") from e
    if len(m.result.indices) or len(m.result.derivatives):
        raise DecodeError("MALFORMED", "a vector upload's result must carry no (index, derivative) pairs")
    return VectorCall(m.device_id, result_from_proto(m.result), mode, values)


def parse_heartbeat(data: bytes) -> str:
    m = parse_message(pb.HeartbeatRequest, data)
    need_device_id(m.device_id)
    return m.device_id


def parse_download(data: bytes) -> DownloadCall:
    m = parse_message(pb.DownloadRequest, data)
    return DownloadCall(m.device_id, m.offset, m.model_version)


def parse_status(data: bytes) -> None:
    parse_message(pb.StatusRequest, data)


def joined_to_bytes(j: Joined) -> bytes:
    return wire_bytes(pb.JoinReply(
        device_index=j.device_index,
        model_version=j.model_version,
        round_id=j.round_id,
        bundle_sha256=j.bundle_sha256,
        bundle_size=j.bundle_size,
        protocol_version=j.protocol_version,
        heartbeat_interval_seconds=j.heartbeat_interval_seconds,
        mode=UPLOAD_MODE_CODES.get(j.mode, pb.UPLOAD_MODE_UNSPECIFIED),
        mode_name=j.mode,
    ))


def task_poll_to_bytes(poll: TaskPoll) -> bytes:
    mode = UPLOAD_MODE_CODES.get(poll.mode, pb.UPLOAD_MODE_UNSPECIFIED)
    if poll.task is not None:
        return wire_bytes(pb.GetTaskReply(
            task=task_to_proto(poll.task), model_version=poll.model_version, mode=mode, mode_name=poll.mode
        ))
    no_task = pb.NoTask(retry_after_seconds=poll.retry_after_seconds, reason=poll.reason)
    return wire_bytes(pb.GetTaskReply(no_task=no_task, model_version=poll.model_version, mode=mode,
                                       mode_name=poll.mode))


def submit_ack_to_bytes(ack: SubmitReceipt) -> bytes:
    return wire_bytes(pb.SubmitReply(accepted=ack.accepted, duplicate=ack.duplicate, round_id=ack.round_id))


def heartbeat_ack_to_bytes(ack: HeartbeatAck) -> bytes:
    return wire_bytes(pb.HeartbeatReply(model_version=ack.model_version, round_id=ack.round_id))


def chunk_to_bytes(c: DownloadChunk) -> bytes:
    return wire_bytes(pb.Chunk(
        offset=c.offset, data=c.data, total_size=c.total_size, sha256=c.sha256, model_version=c.model_version
    ))


def status_to_bytes(s: ServerStatus) -> bytes:
    return wire_bytes(pb.StatusReply(
        protocol_version=s.protocol_version,
        server_version=s.server_version,
        round_id=s.round_id,
        model_version=s.model_version,
        uptime_seconds=s.uptime_seconds,
        status_json=s.status_json,
    ))
