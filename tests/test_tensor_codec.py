"""The tensor codec both services share (fwdfleet.protocol.f32): bytes, shape, sha256, checks."""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.pff.wire import StoreError, check_stored, encoded_to_proto, tensors_from_proto
from fwdfleet.protocol.f32 import (
    EncodedTensor,
    TensorError,
    check_tensor,
    encode_tensor,
    encode_tensors,
    f32_bytes,
    sha256_hex,
)


def test_encoded_tensor_round_trips_as_little_endian_float32() -> None:
    values = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    t = encode_tensor("w", values)
    assert t.shape == (2, 3) and t.data == values.astype("<f4").tobytes() and t.sha256 == sha256_hex(t.data)
    assert np.array_equal(t.array(), values.astype(np.float32)) and not t.array().flags.writeable
    assert [e.name for e in encode_tensors({"a": values, "b": np.ones(2)})] == ["a", "b"]
    assert np.array_equal(check_tensor("w", t.shape, t.data, t.sha256.upper()), t.array())  # digest case-blind


def test_each_check_names_what_is_wrong() -> None:
    data = f32_bytes([1.0, 2.0, 3.0])
    digest = sha256_hex(data)
    with pytest.raises(TensorError, match=r"12 bytes for shape \(4,\) \(expected 16: 4 float32 values\)"):
        check_tensor("v", (4,), data, digest)
    with pytest.raises(TensorError, match="sha256"):
        check_tensor("v", (3,), data, sha256_hex(b"other"))
    bad = f32_bytes([1.0, np.nan, 3.0])
    with pytest.raises(TensorError, match="non-finite"):
        check_tensor("v", (3,), bad, sha256_hex(bad))
    assert np.isnan(check_tensor("v", (3,), bad, sha256_hex(bad), finite=False)[1])  # the fleet checks finiteness later


def test_the_pff_store_reports_codec_failures_as_store_errors() -> None:
    bad = f32_bytes([np.inf])
    with pytest.raises(StoreError, match=r"non-finite values; .*lower --lr"):
        check_stored(EncodedTensor("layer0.w", (1,), bad, sha256_hex(bad)))
    with pytest.raises(StoreError, match="sha256"):
        tensors_from_proto(encoded_to_proto([EncodedTensor("w", (1,), f32_bytes([1.0]), sha256_hex(b""))]))
    got = tensors_from_proto(encoded_to_proto(encode_tensors({"w": np.array([[2.5, -1.0]])})))
    assert got["w"].flags.writeable and got["w"].dtype == np.float32 and got["w"].tolist() == [[2.5, -1.0]]
