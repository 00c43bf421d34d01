"""The wire protocol between devices and the aggregator (gRPC, protobuf package ``fwdfleet.v1``).

* ``proto/fwdfleet/v1/fleet.proto``: the source of truth;
* :mod:`fwdfleet.protocol.v1`: the generated stubs (``scripts/gen_proto.py``; never edit them);
* :mod:`fwdfleet.protocol.serde` (the device's side and the shared message codecs) and
  :mod:`fwdfleet.protocol.server_codec` (the aggregator's side) convert wire messages to the domain
  dataclasses (:class:`fwdfleet.task.RoundTask`, ...) and back;
* :mod:`fwdfleet.protocol.f32`: the tensor codec (float32 bytes, shape, sha256, checks) of both
  services, this one and the pipeline-FF parameter store (``pff.wire``).
"""

PROTOCOL_VERSION = 1
SERVICE_NAME = "fwdfleet.v1.Fleet"

AUTH_METADATA_KEY = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a device token (``authorization: Bearer <token>``)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def loggable(value: object, limit: int = 64) -> str:
    """An untrusted string (a device id, a client version, ...) made safe to log: at most ``limit``
    characters kept, every control, non-ASCII and backslash character escaped (a newline cannot
    forge a log line, a NUL cannot reach the log), and what was cut said."""
    text = value if isinstance(value, str) else str(value)
    shown = text[:limit].encode("unicode_escape").decode("ascii")
    return shown if len(text) <= limit else f"{shown}...(+{len(text) - limit} chars)"
