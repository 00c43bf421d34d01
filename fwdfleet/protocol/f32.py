"""Float32 tensors on the wire: the one tensor codec of both services.

A tensor travels as raw little-endian float32 bytes in C order, with its shape and the sha256
of those bytes. The fleet service (dense and FedAvg vector uploads, ``SubmitVector``) and the
pipeline-FF parameter store (published layers, ``pff.wire``) encode, hash, check and decode
tensors with these functions, so both sides of every link agree on the bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fwdfleet.errors import FwdfleetError

LE_F32 = np.dtype("<f4")
F32Array = npt.NDArray[np.float32]


class TensorError(FwdfleetError):
    """Received tensor bytes do not match their declared shape or digest, or hold non-finite values."""


def f32_bytes(values: npt.ArrayLike) -> bytes:
    """``values`` as little-endian float32 bytes, in C order."""
    return np.ascontiguousarray(values, dtype=LE_F32).tobytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def f32_view(data: bytes, shape: tuple[int, ...] = (-1,)) -> F32Array:
    """A read-only float32 view of little-endian bytes (no copy on little-endian machines)."""
    view: F32Array = np.frombuffer(data, dtype=LE_F32).reshape(shape)
    return view


def f32_array(data: bytes, shape: tuple[int, ...] = (-1,)) -> F32Array:
    """A writable native float32 copy of little-endian bytes."""
    return f32_view(data, shape).astype(np.float32)


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels and is stored: raw little-endian float32 bytes, shape, sha256 of the bytes.

    Kept in this form (the PFF store holds layers so), the digest is computed once per
    publication (by the sender, checked once on receipt), not again for every copy."""

    name: str
    shape: tuple[int, ...]
    data: bytes
    sha256: str

    def array(self) -> F32Array:
        """A read-only float32 view of the bytes."""
        return f32_view(self.data, self.shape)


def encode_tensor(name: str, values: npt.ArrayLike) -> EncodedTensor:
    data = f32_bytes(values)
    return EncodedTensor(name, tuple(int(d) for d in np.shape(values)), data, sha256_hex(data))


def encode_tensors(params: Mapping[str, npt.ArrayLike]) -> list[EncodedTensor]:
    return [encode_tensor(name, value) for name, value in params.items()]


def check_tensor(name: str, shape: tuple[int, ...], data: bytes, sha256: str, *, finite: bool = True) -> F32Array:
    """The received tensor ``name`` as a read-only float32 view, after checking that ``data`` holds
    exactly ``shape``'s values, that its sha256 is ``sha256`` and (``finite``) that every value is
    finite; :class:`TensorError` says which check failed, with the numbers."""
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor {name}: shape {shape} has a negative dimension")
    count = math.prod(shape)  # Python integers: a shape like [2**32, 2**32] cannot wrap around to 0
    if len(data) != 4 * count:
        raise TensorError(f"tensor {name}: {len(data)} bytes for shape {shape} "
                          f"(expected {4 * count}: {count} float32 values)")
    digest = sha256_hex(data)
    if digest != sha256.lower():
        raise TensorError(f"tensor {name}: sha256 {digest[:12]}... but it declares {sha256[:12]!r}...: "
                          "corrupted in transit or on disk; send it again")
    value = f32_view(data, shape)
    if finite and not np.all(np.isfinite(value)):
        raise TensorError(f"tensor {name} has non-finite values")
    return value


def check_encoded(t: EncodedTensor, *, finite: bool = True) -> EncodedTensor:
    """``t`` itself, once :func:`check_tensor` passed on it."""
    check_tensor(t.name, t.shape, t.data, t.sha256, finite=finite)
    return t


def decode_tensor(name: str, shape: tuple[int, ...], data: bytes, sha256: str, *, finite: bool = True) -> F32Array:
    """:func:`check_tensor`, then a writable native float32 copy."""
    return check_tensor(name, shape, data, sha256, finite=finite).astype(np.float32)
