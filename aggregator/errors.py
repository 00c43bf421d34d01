"""Why the aggregator refuses an upload or a call.

A :class:`RejectedError` carries a :class:`RejectCode` and a message that says what went wrong and
what the device should do. The gRPC servicer maps each code to a status in one place; every code
also names the gRPC status it should become (:attr:`RejectCode.grpc_status`) so that the mapping
can be written as ``getattr(grpc.StatusCode, code.grpc_status)`` and never misses a code.
"""

from __future__ import annotations

from enum import Enum

from fwdfleet.errors import FwdfleetError


class RejectCode(str, Enum):  # noqa: UP042  (str(code) must stay "RejectCode.X" in messages)
    """The reasons an upload or a call is refused."""

    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"  # the device never joined (or joined another server)
    STALE_ROUND = "STALE_ROUND"  # the round or model version is not the current one
    BAD_INDEX = "BAD_INDEX"  # a perturbation index outside what was issued to this device
    DUPLICATE_INDEX = "DUPLICATE_INDEX"  # the same perturbation index twice in one upload
    NON_FINITE = "NON_FINITE"  # NaN or infinity in a value
    TOO_LARGE = "TOO_LARGE"  # a value beyond the configured bound
    NOT_SELECTED = "NOT_SELECTED"  # the device has no outstanding request in this round
    MALFORMED = "MALFORMED"  # the upload does not have the shape the round asks for
    ALREADY_SUBMITTED = "ALREADY_SUBMITTED"  # a *different* second upload for the same request
    TOO_MANY_DEVICES = "TOO_MANY_DEVICES"  # the token already registered as many devices as it may

    @property
    def grpc_status(self) -> str:
        """Name of the ``grpc.StatusCode`` member this code maps to."""
        return _GRPC_STATUS[self]


_GRPC_STATUS: dict[RejectCode, str] = {
    RejectCode.UNKNOWN_DEVICE: "UNAUTHENTICATED",
    RejectCode.STALE_ROUND: "FAILED_PRECONDITION",
    RejectCode.BAD_INDEX: "INVALID_ARGUMENT",
    RejectCode.DUPLICATE_INDEX: "INVALID_ARGUMENT",
    RejectCode.NON_FINITE: "INVALID_ARGUMENT",
    RejectCode.TOO_LARGE: "INVALID_ARGUMENT",
    RejectCode.NOT_SELECTED: "FAILED_PRECONDITION",
    RejectCode.MALFORMED: "INVALID_ARGUMENT",
    RejectCode.ALREADY_SUBMITTED: "ALREADY_EXISTS",
    RejectCode.TOO_MANY_DEVICES: "PERMISSION_DENIED",
}


class RejectedError(FwdfleetError):
    """An upload or call the aggregator refuses; nothing of it was counted."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
