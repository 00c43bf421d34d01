"""A bounded, seeded protobuf fuzz run of both services over TLS: no handler answers UNKNOWN or
INTERNAL (every bad input gets a status that says what is wrong), and afterwards real device
clients still complete rounds on the same aggregator.

Messages are built from the request types' descriptors with hostile values (extreme and negative
integers, NaN and infinities, control characters and long strings, deep nesting), a third of them
then mutated at the byte level (flips, truncations, appended garbage), and a tenth are pure noise.
"""

from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import grpc
import pytest
from _grpc_fixtures import FLEET_TOKEN, aggregator_config, channel, dataset, make_env, start
from google.protobuf.descriptor import FieldDescriptor as F

from fwdfleet.device_runtime.client import DeviceClient, DeviceClientConfig
from fwdfleet.pff.store import StoreServer
from fwdfleet.protocol import bearer_metadata
from fwdfleet.protocol.v1 import fleet_pb2, pff_pb2

SEED = 20261206
FLEET_CASES = 3000
STORE_CASES = 1000
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

FLEET = {"Join": ("JoinRequest", False), "GetTask": ("GetTaskRequest", False), "Submit": ("SubmitRequest", False),
         "SubmitVector": ("SubmitVectorRequest", False), "Heartbeat": ("HeartbeatRequest", False),
         "Status": ("StatusRequest", False), "DownloadBundle": ("DownloadRequest", True),
         "DownloadTrainables": ("DownloadRequest", True)}
STORE = {"Publish": "PublishRequest", "Fetch": "FetchRequest", "Report": "ProgressReport",
         "Status": "PffStatusRequest"}
DEVICE_IDS = ["a", "b", "fz-1", "fz-2", "", "x" * 300, "dev\n\x00", "é"]


def _value(field, rng: random.Random, depth: int):
    t = field.type
    if t == F.TYPE_MESSAGE:
        return _message(field.message_type._concrete_class, rng, depth + 1) if depth < 3 else None
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, rng.uniform(-10, 10), 0.01])
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_ENUM):
        return rng.choice([0, 1, -1, 2**31 - 1, -(2**31), rng.randint(-10, 10)])
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1, 2**32, rng.randint(0, 1000)])
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1, rng.randint(0, 1000)])
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        if field.name == "device_id":
            return rng.choice(DEVICE_IDS)
        return rng.choice(["", "scalar", "fedavg", "dense", "w", "\n\x00\r", "z" * rng.randint(0, 3000)])
    if t == F.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 3, 4, 24, 1000]))
    return None


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == F.LABEL_REPEATED


def _message(cls, rng: random.Random, depth: int = 0):
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.25:
            continue
        if _repeated(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                container = getattr(msg, field.name)
                for _ in range(rng.randint(0, 3)):
                    key = _value(field.message_type.fields_by_name["key"], rng, depth)
                    val = _value(field.message_type.fields_by_name["value"], rng, depth)
                    scalar = field.message_type.fields_by_name["value"].type != F.TYPE_MESSAGE
                    if key is not None and val is not None and scalar:
                        container[key] = val
                continue
            for _ in range(rng.choice([0, 1, 2, 4, 5, 64])):
                v = _value(field, rng, depth)
                if v is None:
                    break
                if field.type == F.TYPE_MESSAGE:
                    getattr(msg, field.name).add().CopyFrom(v)
                else:
                    getattr(msg, field.name).append(v)
        else:
            v = _value(field, rng, depth)
            if v is None:
                continue
            if field.type == F.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(v)
            else:
                setattr(msg, field.name, v)
    return msg


def _payload(cls, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 200))
    msg = _message(cls, rng)
    if "wait_seconds" in cls.DESCRIPTOR.fields_by_name and not math.isnan(msg.wait_seconds):
        msg.wait_seconds = min(msg.wait_seconds, 0.01)  # a long poll is legal; keep the run fast
    data = bytearray(msg.SerializeToString())
    if roll < 0.4 and data:
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[rng.randrange(len(data)):]
            else:
                data += rng.randbytes(rng.randint(1, 16))
            if not data:
                break
    return bytes(data)


def _fuzz(ch: grpc.Channel, service: str, methods: dict, cases: int, rng: random.Random) -> dict[str, int]:
    seen: dict[str, int] = {}
    for i in range(cases):
        name = rng.choice(sorted(methods))
        cls_name, streaming = methods[name] if isinstance(methods[name], tuple) else (methods[name], False)
        module = fleet_pb2 if service == "fwdfleet.v1.Fleet" else pff_pb2
        payload = _payload(getattr(module, cls_name), rng)
        path = f"/{service}/{name}"
        token = FLEET_TOKEN if rng.random() < 0.9 else rng.choice(["", "wrong", "x" * 5000])
        meta = bearer_metadata(token) if token else ()
        try:
            if streaming:
                for _ in ch.unary_stream(path)(payload, timeout=5, metadata=meta):
                    pass
            else:
                ch.unary_unary(path)(payload, timeout=5, metadata=meta)
            code = "OK"
        except grpc.RpcError as e:
            assert e.code() not in FORBIDDEN, f"case {i}: {name}({payload[:80]!r}) -> {e.code()} {e.details()}"
            code = e.code().name
        seen[code] = seen.get(code, 0) + 1
    return seen


def test_fuzzed_calls_never_reach_unknown_or_internal_and_devices_still_train(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    rng = random.Random(SEED)
    config = aggregator_config(rounds={"min_devices": 2, "min_results": 2, "deadline_s": 2.0,
                                       "heartbeat_timeout_s": 3.0, "num_rounds": 0})
    server = start(env, config, long_poll_max_s=0.05)
    store = StoreServer(tmp_path / "store", tls_cert=str(env.certs["cert"]), tls_key=str(env.certs["key"]),
                        tokens_file=str(env.tokens))
    store_ch = grpc.secure_channel(store.address, grpc.ssl_channel_credentials(env.certs["ca"].read_bytes()))
    ch = channel(env, server.port)
    try:
        fleet_codes = _fuzz(ch, "fwdfleet.v1.Fleet", FLEET, FLEET_CASES, rng)
        store_codes = _fuzz(store_ch, "fwdfleet.v1.PffStore", STORE, STORE_CASES, rng)
        assert sum(fleet_codes.values()) == FLEET_CASES and sum(store_codes.values()) == STORE_CASES
        assert fleet_codes.get("INVALID_ARGUMENT", 0) > 200 and fleet_codes.get("UNAUTHENTICATED", 0) > 20, fleet_codes
        assert fleet_codes.get("OK", 0) > 200 and store_codes.get("OK", 0) > 100, (fleet_codes, store_codes)
        # the aggregator is still whole: two real devices complete rounds on it
        version = server.servicer.coordinator.status().model_version
        clients = [DeviceClient(DeviceClientConfig(address=f"127.0.0.1:{server.port}", device_id=d,
                                                   token=FLEET_TOKEN, root_cert=str(env.certs["ca"]),
                                                   long_poll_s=0.05, initial_backoff_s=0.05, max_backoff_s=0.3,
                                                   rpc_timeout_s=10), env.tmp / d, dataset(i), seed=i)
                   for i, d in enumerate(("real-a", "real-b"))]
        threads = [threading.Thread(target=c.run, args=(2,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [c.stats.rounds for c in clients] == [2, 2], [c.stats for c in clients]
        assert server.servicer.coordinator.status().model_version >= version + 2
    finally:
        ch.close()
        store_ch.close()
        store.stop()
        server.stop()


@pytest.mark.parametrize("cls", [fleet_pb2.SubmitRequest, pff_pb2.PublishRequest])
def test_the_fuzzer_builds_varied_messages(cls) -> None:
    rng = random.Random(SEED)
    payloads = {_payload(cls, rng) for _ in range(50)}
    assert len(payloads) > 40
