"""PFF store messages <-> domain values: the only module that touches ``pff_pb2``.

A tensor travels as raw little-endian float32 bytes with its shape and the sha256 of those
bytes; decoding checks the size against the shape, the digest, and that every value is finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol.f32 import f32_array, f32_bytes, f32_view, sha256_hex
from fwdfleet.protocol.v1 import pff_pb2 as pb

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


def decode_tensor(name: str, shape: tuple[int, ...], data: bytes, sha256: str) -> np.ndarray:
    expected = int(np.prod(shape, dtype=np.int64)) * 4
    if len(data) != expected:
        raise StoreError(f"tensor {name}: {len(data)} bytes for shape {shape} (expected {expected})")
    if sha256_hex(data) != sha256:
        raise StoreError(f"tensor {name}: sha256 mismatch (corrupted in transit or on disk)")
    value = f32_array(data, shape)
    if not np.all(np.isfinite(value)):
        raise StoreError(f"tensor {name} has non-finite values; the layer diverged: lower --lr")
    return value


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels and is stored: raw little-endian float32 bytes, shape, sha256 of the bytes.

    The store keeps layers in this form, so that the digest is computed once per publication (by the
    sender, checked once on receipt), not again for the disk and for every fetch.
    """

    name: str
    shape: tuple[int, ...]
    data: bytes
    sha256: str

    def array(self) -> np.ndarray:
        """A read-only float32 view of the bytes."""
        return f32_view(self.data, self.shape)


def encode(params: Mapping[str, np.ndarray]) -> list[EncodedTensor]:
    out = []
    for name, value in params.items():
        data = f32_bytes(value)
        out.append(EncodedTensor(name, tuple(int(d) for d in np.shape(value)), data, sha256_hex(data)))
    return out


def encoded_from_proto(msgs: Any) -> list[EncodedTensor]:
    """Received tensors, checked (unique names, size, sha256, finite values) but not copied into arrays."""
    out: list[EncodedTensor] = []
    for t in msgs:
        if not t.name or any(e.name == t.name for e in out):
            raise StoreError(f"tensor names must be unique and non-empty, got {t.name!r}")
        shape = tuple(int(d) for d in t.shape)
        decode_tensor(t.name, shape, t.data, t.sha256)
        out.append(EncodedTensor(t.name, shape, t.data, t.sha256))
    return out


def encoded_to_proto(tensors: list[EncodedTensor]) -> list[pb.Tensor]:
    return [pb.Tensor(name=t.name, shape=list(t.shape), data=t.data, sha256=t.sha256) for t in tensors]


def tensors_to_proto(params: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    out = []
    for name in params:
        data = f32_bytes(params[name])
        out.append(pb.Tensor(name=name, shape=list(np.shape(params[name])), data=data, sha256=sha256_hex(data)))
    return out


def tensors_from_proto(msgs: Any) -> Params:
    out: Params = {}
    for t in msgs:
        if not t.name or t.name in out:
            raise StoreError(f"tensor names must be unique and non-empty, got {t.name!r}")
        out[t.name] = decode_tensor(t.name, tuple(int(d) for d in t.shape), t.data, t.sha256)
    return out


def record_to_proto(r: TaskRecord) -> pb.TaskRecord:
    return pb.TaskRecord(**r.to_dict())


def record_from_proto(m: pb.TaskRecord) -> TaskRecord:
    return TaskRecord(**{f.name: getattr(m, f.name) for f in fields(TaskRecord)})


def progress_to_proto(p: Progress) -> pb.ProgressReport:
    return pb.ProgressReport(**asdict(p))


def progress_from_proto(m: pb.ProgressReport) -> Progress:
    return Progress(**{f.name: getattr(m, f.name) for f in fields(Progress)})
