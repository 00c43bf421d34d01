"""Float32 tensors on the wire: raw little-endian bytes and the sha256 of those bytes.

Shared by the fleet protocol (dense and FedAvg vector uploads) and the pipeline-FF parameter
store, so that both sides of every link encode, hash and decode tensors the same way.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

LE_F32 = np.dtype("<f4")


def f32_bytes(values: npt.ArrayLike) -> bytes:
    """``values`` as little-endian float32 bytes, in C order."""
    return np.ascontiguousarray(values, dtype=LE_F32).tobytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def f32_view(data: bytes, shape: tuple[int, ...] = (-1,)) -> npt.NDArray[np.float32]:
    """A read-only float32 view of little-endian bytes (no copy on little-endian machines)."""
    return np.frombuffer(data, dtype=LE_F32).reshape(shape)  # type: ignore[return-value]


def f32_array(data: bytes, shape: tuple[int, ...] = (-1,)) -> npt.NDArray[np.float32]:
    """A writable native float32 copy of little-endian bytes."""
    return f32_view(data, shape).astype(np.float32)
