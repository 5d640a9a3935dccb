"""Domain errors and the one table that maps them to gRPC statuses.

Servicers never set a status code: domain code raises one of these (or a store error), and
the interceptor in server/interceptors.py turns it into a status with :func:`status_of`.
Messages name the problem (the field, the scenario, the record) and never a person's
identifier beyond what the caller sent.

Every error status carries ``google.rpc.Status`` details (``grpc-status-details-bin``, read
with ``grpc_status.rpc_status.from_call``): an ``ErrorInfo`` whose ``reason`` is stable and
whose ``domain`` is ``qianjiang.v1``, so that callers branch on data, not on English text.
INVALID_ARGUMENT also carries a ``BadRequest`` with one ``FieldViolation``. The reasons
(code: reason, metadata):

* INVALID_ARGUMENT: ``INVALID_ARGUMENT`` (``field``: the offending field, e.g. ``card_token``,
  ``citizen_ids[1]``, ``record.date``; ``request`` for a message that does not parse)
* UNAUTHENTICATED: ``UNAUTHENTICATED``; PERMISSION_DENIED: ``PERMISSION_DENIED``
* NOT_FOUND: ``UNKNOWN_SCENARIO`` (``scenario``), ``UNKNOWN_CITIZEN``, ``RECORD_NOT_FOUND``
  (also another source's record: "not yours" and "not there" are one answer),
  ``UNKNOWN_DECISION`` (ReplayDecision), ``DISPUTE_NOT_FOUND`` and ``REPAIR_NOT_FOUND`` (also
  another source's: RightsService)
* FAILED_PRECONDITION: ``NOT_AUTHORISED`` (no consent, or revoked), ``UNDER_18`` (no score),
  ``RECORD_NOT_ACTIVE`` (the record is withdrawn, repaired, or suspended by a dispute),
  ``UNDER_REVIEW`` (a dispute while a repair application waits, or the reverse),
  ``ALREADY_ANSWERED`` (a dispute answered, an application decided: final), ``NOT_REPAIRABLE``
  (a positive record, one that no longer counts, one inside its minimum publicity period),
  ``TEST_CLOCK_OFF``, ``SNAPSHOT_REQUIRED`` (GateService/GetDeltas: the deltas are no longer
  kept, load the gate's snapshot again), ``STORE_REJECTED`` (the store
  refused the write for good: resending it fails again), ``NOTHING_TO_REPLAY`` (a decision
  about an unknown card, or one whose release is gone)
* ALREADY_EXISTS: ``RECORD_CONFLICT`` (``field`` where the store names it: a record id
  resent with other content), ``CONFLICT`` (a card token bound to another citizen),
  ``DISPUTE_OPEN`` (a second open dispute on a record), ``REPAIR_PENDING`` (a second waiting
  repair application)
* RESOURCE_EXHAUSTED: ``STREAM_LIMIT`` (``limit``: too many open streams on this worker;
  retry with backoff), ``CALL_LIMIT`` (``limit``: this worker has its most calls in flight),
  ``CALLER_QUOTA`` (``limit``, ``quota``: ``calls`` or ``streams``: this caller identity has
  its share of the worker in flight; ``batch_tokens``: it sent its share of card tokens a
  second in batch checks; the others are still served), ``CAPACITY_EXHAUSTED``
  (the serving state or token index is full), ``AUDIT_FULL``
* UNAVAILABLE (retry with backoff; clients/client.py does): ``STORE_UNAVAILABLE``,
  ``AUDIT_UNAVAILABLE``, ``NOT_READY`` (loading, draining, switching models; GateService: no
  offline list of the scenario published yet)
* DEADLINE_EXCEEDED: ``DEADLINE_EXCEEDED`` (the deadline passed before the call started),
  ``SERVER_DEADLINE`` (``limit``: a call without a deadline, or with a later one, ran for the
  server's bound on a call, in seconds), ``STREAM_IDLE`` (``limit``: a stream sent no message
  for that many seconds and was ended: reopen it when there is something to send; not
  UNAVAILABLE, which clients retry blindly)
* UNKNOWN: ``STORE_ERROR`` (the store failed in a way it did not classify: whether a retry
  helps is not known, so it is not UNAVAILABLE, which clients retry blindly)
* INTERNAL: ``INTERNAL`` (a bug: the message is "internal error" and nothing else is said)

A status grpc itself sends (CANCELLED past ``--max-pending-calls``, UNAVAILABLE when a
connection drops) has no details.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from server import store
from server.audit import AuditFull, AuditUnavailable
from server.store import (
    AlreadyClosed, Conflict, DisputeNotFound, DisputeOpen, NotFound, NotRepairable, RepairNotFound, RepairPending,
    StoreError, StoreRejected, StoreUnavailable, UnderReview, WrongState,
)
from server.token_index import TokenIndexFull

#: Longest message a status carries. Messages quote what the caller sent (a scenario, a
#: variable), and a status's message travels percent-encoded in a header: grpc clients drop
#: a response whose headers exceed 8-16 KiB, and would see RESOURCE_EXHAUSTED instead of it.
MAX_MESSAGE_CHARS = 400

#: ErrorInfo.domain of every error this service sends.
DOMAIN = "qianjiang.v1"

#: The trailing metadata key of the google.rpc.Status details (grpc_status.rpc_status).
DETAILS_KEY = "grpc-status-details-bin"

#: Longest value quoted from the request into ErrorInfo metadata (the details travel in a
#: trailer too, beside the message).
MAX_METADATA_CHARS = 128


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
        self.scenario = name


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


class StreamLimit(ServiceError):
    """This worker has ``limit`` client- or bidi-streaming calls open already."""

    def __init__(self, limit: int):
        super().__init__(f"this worker has {limit} streams open, its limit; retry with backoff")
        self.limit = limit


class CallLimit(ServiceError):
    """This worker has ``limit`` calls of the services in flight (server/interceptors.py)."""

    def __init__(self, limit: int):
        super().__init__(f"this worker has {limit} calls in flight, its limit; retry with backoff")
        self.limit = limit


class CallerQuota(ServiceError):
    """The calling identity has ``limit`` calls (``quota`` "calls") or streams ("streams") in
    flight on this worker: its share, so that one caller cannot take every slot."""

    def __init__(self, quota: str, limit: int):
        super().__init__(f"this caller has {limit} {quota} in flight on this worker, its quota; retry with backoff")
        self.quota, self.limit = quota, limit


class BatchQuota(CallerQuota):
    """The calling identity has sent more than ``limit`` card tokens a second in batch checks
    on this worker (each token is a disclosure the audit log writes): its share."""

    def __init__(self, limit: int):
        ServiceError.__init__(self, f"this caller has sent more than {limit} card tokens a second in batch checks "
                                    "on this worker, its quota; retry with backoff")
        self.quota, self.limit = "batch_tokens", limit


class DeadlineExceeded(ServiceError):
    def __init__(self, started: bool = False):
        super().__init__("deadline exceeded before the answer: nothing was disclosed" if started
                         else "deadline exceeded before the call started")


class ServerDeadline(ServiceError):
    """A call ran for the server's bound (``limit`` seconds): it set no deadline, or a later one."""

    def __init__(self, limit: float):
        super().__init__(f"the call ran for {limit:g} s, the server's bound on a call without an earlier deadline")
        self.limit = limit


class StreamIdle(ServiceError):
    """A stream sent no message for ``limit`` seconds and was ended (reopen it)."""

    def __init__(self, limit: float):
        super().__init__(f"no message on this stream for {limit:g} s: ended; reopen it when there is something to send")
        self.limit = limit


class NotReady(ServiceError):
    def __init__(self):
        super().__init__("the service is loading or draining; retry shortly")


class UnknownDecision(ServiceError):
    """No disclosure has this decision id (or it was made under another audit key)."""

    def __init__(self):
        super().__init__("no decision or disclosure has this id")


class TestClockOff(ServiceError):
    """RightsService/AdvanceTestClock on a server started without --test-clock."""

    def __init__(self):
        super().__init__("this server's rights clock is the real one: only a server started with --test-clock "
                         "(development and tests; --production refuses it) moves it")


class NothingToReplay(ServiceError):
    """An appeal's replay cannot be made: the disclosure concerns nobody (an unknown card),
    or what made it is gone (the audit log is off, the release left the registry)."""


class SnapshotRequired(ServiceError):
    """GateService/GetDeltas: the deltas a gate asks for are no longer kept (older than the
    window, a restart since) or it is ahead of the service: load the snapshot again
    (server/gate_snapshot.py)."""


class GateNotReady(NotReady):
    """GateService: no offline list of the scenario is published yet (after a start): NOT_READY."""

    def __init__(self, scenario: str):
        ServiceError.__init__(self, f"no offline list of {scenario!r} is published yet; retry shortly")


@dataclass(frozen=True)
class Kind:
    """What a class of error becomes: its status code and its stable ErrorInfo reason."""

    code: grpc.StatusCode
    reason: str


_S = grpc.StatusCode

#: Every domain error class, its status code and reason. Subclasses resolve through the MRO.
ERRORS: dict[type[BaseException], Kind] = {
    InvalidArgument: Kind(_S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    # A client stream's message that is not valid protobuf: grpc.aio deserialises stream
    # messages as the handler reads them, so the error reaches the interceptor.
    DecodeError: Kind(_S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    Unauthenticated: Kind(_S.UNAUTHENTICATED, "UNAUTHENTICATED"),
    PermissionDenied: Kind(_S.PERMISSION_DENIED, "PERMISSION_DENIED"),
    UnknownScenario: Kind(_S.NOT_FOUND, "UNKNOWN_SCENARIO"),
    UnknownCitizen: Kind(_S.NOT_FOUND, "UNKNOWN_CITIZEN"),
    NotFound: Kind(_S.NOT_FOUND, "RECORD_NOT_FOUND"),  # or UNKNOWN_CITIZEN: _reason()
    NotAuthorised: Kind(_S.FAILED_PRECONDITION, "NOT_AUTHORISED"),
    NoScore: Kind(_S.FAILED_PRECONDITION, "UNDER_18"),
    Conflict: Kind(_S.ALREADY_EXISTS, "CONFLICT"),
    WrongState: Kind(_S.FAILED_PRECONDITION, "RECORD_NOT_ACTIVE"),
    CapacityExhausted: Kind(_S.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED"),
    TokenIndexFull: Kind(_S.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED"),
    StreamLimit: Kind(_S.RESOURCE_EXHAUSTED, "STREAM_LIMIT"),
    CallLimit: Kind(_S.RESOURCE_EXHAUSTED, "CALL_LIMIT"),
    CallerQuota: Kind(_S.RESOURCE_EXHAUSTED, "CALLER_QUOTA"),
    StreamIdle: Kind(_S.DEADLINE_EXCEEDED, "STREAM_IDLE"),
    ServerDeadline: Kind(_S.DEADLINE_EXCEEDED, "SERVER_DEADLINE"),
    AuditFull: Kind(_S.RESOURCE_EXHAUSTED, "AUDIT_FULL"),
    AuditUnavailable: Kind(_S.UNAVAILABLE, "AUDIT_UNAVAILABLE"),
    NotReady: Kind(_S.UNAVAILABLE, "NOT_READY"),
    UnknownDecision: Kind(_S.NOT_FOUND, "UNKNOWN_DECISION"),
    NothingToReplay: Kind(_S.FAILED_PRECONDITION, "NOTHING_TO_REPLAY"),
    # The citizens' rights (server/rights.py, proto/qianjiang/v1/rights.proto).
    DisputeNotFound: Kind(_S.NOT_FOUND, "DISPUTE_NOT_FOUND"),
    RepairNotFound: Kind(_S.NOT_FOUND, "REPAIR_NOT_FOUND"),
    DisputeOpen: Kind(_S.ALREADY_EXISTS, "DISPUTE_OPEN"),
    RepairPending: Kind(_S.ALREADY_EXISTS, "REPAIR_PENDING"),
    UnderReview: Kind(_S.FAILED_PRECONDITION, "UNDER_REVIEW"),
    AlreadyClosed: Kind(_S.FAILED_PRECONDITION, "ALREADY_ANSWERED"),
    NotRepairable: Kind(_S.FAILED_PRECONDITION, "NOT_REPAIRABLE"),
    TestClockOff: Kind(_S.FAILED_PRECONDITION, "TEST_CLOCK_OFF"),
    # Offline gates (server/gate_snapshot.py, proto/qianjiang/v1/gate.proto).
    SnapshotRequired: Kind(_S.FAILED_PRECONDITION, "SNAPSHOT_REQUIRED"),
    DeadlineExceeded: Kind(_S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    # Clients retry UNAVAILABLE, and only it: only what may succeed on a retry maps to it.
    StoreUnavailable: Kind(_S.UNAVAILABLE, "STORE_UNAVAILABLE"),
    StoreRejected: Kind(_S.FAILED_PRECONDITION, "STORE_REJECTED"),
    # Unclassified: a retry may or may not help (a closed store, a lock timeout, a schema
    # newer than the code), so not UNAVAILABLE, and not INTERNAL, which hides the message.
    StoreError: Kind(_S.UNKNOWN, "STORE_ERROR"),
}

# A record id resent with other content (server/store.py, where it is defined): the store
# names the differing field in ``.field``.
_RecordConflict = getattr(store, "RecordConflict", None)
if _RecordConflict is not None:
    ERRORS[_RecordConflict] = Kind(_S.ALREADY_EXISTS, "RECORD_CONFLICT")

#: What a bug becomes: nothing about it leaves the server.
INTERNAL = Kind(_S.INTERNAL, "INTERNAL")
INTERNAL_MESSAGE = "internal error"


def kind_of(exc: BaseException) -> Kind | None:
    """The table's entry for exc's class, or None for a bug (which becomes INTERNAL)."""
    for cls in type(exc).__mro__:
        kind = ERRORS.get(cls)
        if kind is not None:
            return kind
    return None


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error, or None for a bug (which becomes INTERNAL)."""
    kind = kind_of(exc)
    return kind.code if kind is not None else None


def _quoted(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_METADATA_CHARS else text[: MAX_METADATA_CHARS - 3] + "..."


def _reason(exc: BaseException, kind: Kind) -> str:
    if kind.reason == "RECORD_NOT_FOUND" and str(exc).startswith("citizen"):
        # The store's NotFound covers both of its ids; which one it is, its message says
        # first ("citizen 'x' not found", "record 'y' not found", server/store.py).
        return "UNKNOWN_CITIZEN"
    return kind.reason


def _metadata(exc: BaseException, kind: Kind) -> dict[str, str]:
    if isinstance(exc, DecodeError):
        return {"field": "request"}
    meta = {}
    field = getattr(exc, "field", None)
    if field:
        meta["field"] = _quoted(field)
    if isinstance(exc, UnknownScenario):
        meta["scenario"] = _quoted(exc.scenario)
    elif isinstance(exc, (StreamLimit, CallLimit, ServerDeadline, StreamIdle)):
        meta["limit"] = f"{exc.limit:g}"
    elif isinstance(exc, CallerQuota):
        meta["limit"], meta["quota"] = str(exc.limit), exc.quota
    return meta


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata with the google.rpc.Status details) for an error
    that reaches a caller; a bug (not in the table) is INTERNAL, "internal error"."""
    kind = kind_of(exc)
    if kind is None:
        kind, message, meta = INTERNAL, INTERNAL_MESSAGE, {}
    else:
        message, meta = str(exc), _metadata(exc, kind)
    # valid UTF-8 (a protobuf string), and the same text in the status and in its details
    message = message.encode("utf-8", "replace").decode("utf-8")
    status = status_pb2.Status(code=kind.code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=_reason(exc, kind), domain=DOMAIN, metadata=meta))
    if kind.code is _S.INVALID_ARGUMENT:
        field = meta.get("field", "")
        status.details.add().Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    return kind.code, message, ((DETAILS_KEY, status.SerializeToString()),)
