"""The Fleet service's methods as bytes-in/bytes-out gRPC calls (no grpc-side (de)serialization).

Requests reach the servicer as raw bytes so that a malformed message is reported by
:mod:`fwdfleet.protocol.server_codec` as ``INVALID_ARGUMENT`` rather than by grpc as ``INTERNAL``.
"""

from __future__ import annotations

from typing import Any

import grpc

from fwdfleet.protocol import SERVICE_NAME
from fwdfleet.protocol.v1 import fleet_pb2 as pb
from fwdfleet.protocol.v1 import fleet_pb2_grpc as pb_grpc

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
    so every encode/decode step goes through ``serde`` and ``server_codec``.
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
        raise RuntimeError(f"rpc.METHODS {METHODS} does not match the generated service {generated}")
    if not hasattr(pb_grpc, "FleetServicer"):
        raise RuntimeError("generated fleet_pb2_grpc has no FleetServicer; regenerate the stubs")
