"""Domain errors and the one table that maps them to gRPC status codes.

Servicers never set a status code: domain code raises one of these (or a store error), and
the interceptor in server/interceptors.py looks the class up in :data:`STATUS_CODES`.
Messages name the problem (the field, the scenario, the record) and never a person's
identifier beyond what the caller sent.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from server.audit import AuditFull, AuditUnavailable
from server.store import Conflict, NotFound, StoreError, WrongState
from server.token_index import TokenIndexFull

#: Longest message a status carries. Messages quote what the caller sent (a scenario, a
#: variable), and a status's message travels percent-encoded in a header: grpc clients drop
#: a response whose headers exceed 8-16 KiB, and would see RESOURCE_EXHAUSTED instead of it.
MAX_MESSAGE_CHARS = 400


class ServiceError(Exception):
    """Base of the errors a caller can cause or must know about."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class InvalidArgument(ServiceError):
    """Malformed input. The message starts with the field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownScenario(ServiceError):
    def __init__(self, name: str):
        super().__init__(f"scenario {name!r} is not configured (ListScenarios gives the names)")


class UnknownCitizen(ServiceError):
    def __init__(self):
        super().__init__("citizen not found")


class NotAuthorised(ServiceError):
    """The citizen has not authorised scoring (or revoked it)."""

    def __init__(self):
        super().__init__("the citizen has not authorised the score's use")


class NoScore(ServiceError):
    """The citizen has no score: under 18."""

    def __init__(self):
        super().__init__("no score: the citizen is under 18")


class Unauthenticated(ServiceError):
    """No valid identity: no or an unknown token, no verified client certificate."""

    def __init__(self, why: str = "no valid credentials"):
        super().__init__(f"unauthenticated: {why}")


class PermissionDenied(ServiceError):
    """A known identity that the policy does not allow this."""

    def __init__(self, what: str):
        super().__init__(f"permission denied: {what}")


class CapacityExhausted(ServiceError):
    pass


class DeadlineExceeded(ServiceError):
    def __init__(self):
        super().__init__("deadline exceeded before the call started")


class NotReady(ServiceError):
    def __init__(self):
        super().__init__("the service is loading or draining; retry shortly")


#: Every domain error class and its status code. Subclasses resolve through the MRO.
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    UnknownScenario: grpc.StatusCode.NOT_FOUND,
    UnknownCitizen: grpc.StatusCode.NOT_FOUND,
    NotFound: grpc.StatusCode.NOT_FOUND,
    NotAuthorised: grpc.StatusCode.FAILED_PRECONDITION,
    NoScore: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TokenIndexFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AuditFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    StoreError: grpc.StatusCode.UNAVAILABLE,
    # A client stream's message that is not valid protobuf: grpc.aio deserialises stream
    # messages as the handler reads them, so the error reaches the interceptor.
    DecodeError: grpc.StatusCode.INVALID_ARGUMENT,
}


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error, or None for a bug (which becomes INTERNAL)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return None
