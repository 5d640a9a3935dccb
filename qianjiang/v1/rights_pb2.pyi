import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListCitizenRecordsRequest(_message.Message):
    __slots__ = ("citizen_id",)
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    def __init__(self, citizen_id: _Optional[str] = ...) -> None: ...

class CitizenRecord(_message.Message):
    __slots__ = ("source", "record_id", "variable", "direction", "tier", "date", "value", "status", "version", "open_dispute_id", "pending_repair_id", "counts_until", "repairable_from")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_DISPUTE_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_REPAIR_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTS_UNTIL_FIELD_NUMBER: _ClassVar[int]
    REPAIRABLE_FROM_FIELD_NUMBER: _ClassVar[int]
    source: str
    record_id: str
    variable: str
    direction: str
    tier: str
    date: str
    value: float
    status: str
    version: int
    open_dispute_id: str
    pending_repair_id: str
    counts_until: str
    repairable_from: str
    def __init__(self, source: _Optional[str] = ..., record_id: _Optional[str] = ..., variable: _Optional[str] = ..., direction: _Optional[str] = ..., tier: _Optional[str] = ..., date: _Optional[str] = ..., value: _Optional[float] = ..., status: _Optional[str] = ..., version: _Optional[int] = ..., open_dispute_id: _Optional[str] = ..., pending_repair_id: _Optional[str] = ..., counts_until: _Optional[str] = ..., repairable_from: _Optional[str] = ...) -> None: ...

class ListCitizenRecordsResponse(_message.Message):
    __slots__ = ("records", "disclosure_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[CitizenRecord]
    disclosure_id: str
    def __init__(self, records: _Optional[_Iterable[_Union[CitizenRecord, _Mapping]]] = ..., disclosure_id: _Optional[str] = ...) -> None: ...

class FileDisputeRequest(_message.Message):
    __slots__ = ("citizen_id", "source", "record_id", "reason")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    source: str
    record_id: str
    reason: str
    def __init__(self, citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., record_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Dispute(_message.Message):
    __slots__ = ("dispute_id", "citizen_id", "source", "record_id", "variable", "reason", "state", "filed_at", "due_at", "due_date", "overdue", "suspended_at", "answered_at", "answered_by", "note", "record_status", "record_version", "position", "event_id")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Dispute.State]
        OPEN: _ClassVar[Dispute.State]
        SUSPENDED: _ClassVar[Dispute.State]
        CONFIRMED: _ClassVar[Dispute.State]
        CORRECTED: _ClassVar[Dispute.State]
        WITHDRAWN: _ClassVar[Dispute.State]
    STATE_UNSPECIFIED: Dispute.State
    OPEN: Dispute.State
    SUSPENDED: Dispute.State
    CONFIRMED: Dispute.State
    CORRECTED: Dispute.State
    WITHDRAWN: Dispute.State
    DISPUTE_ID_FIELD_NUMBER: _ClassVar[int]
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILED_AT_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_FIELD_NUMBER: _ClassVar[int]
    DUE_DATE_FIELD_NUMBER: _ClassVar[int]
    OVERDUE_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_AT_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_AT_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RECORD_STATUS_FIELD_NUMBER: _ClassVar[int]
    RECORD_VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    dispute_id: str
    citizen_id: str
    source: str
    record_id: str
    variable: str
    reason: str
    state: Dispute.State
    filed_at: _timestamp_pb2.Timestamp
    due_at: _timestamp_pb2.Timestamp
    due_date: str
    overdue: bool
    suspended_at: _timestamp_pb2.Timestamp
    answered_at: _timestamp_pb2.Timestamp
    answered_by: str
    note: str
    record_status: str
    record_version: int
    position: int
    event_id: str
    def __init__(self, dispute_id: _Optional[str] = ..., citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., record_id: _Optional[str] = ..., variable: _Optional[str] = ..., reason: _Optional[str] = ..., state: _Optional[_Union[Dispute.State, str]] = ..., filed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., due_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., due_date: _Optional[str] = ..., overdue: _Optional[bool] = ..., suspended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., answered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., answered_by: _Optional[str] = ..., note: _Optional[str] = ..., record_status: _Optional[str] = ..., record_version: _Optional[int] = ..., position: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class ListDisputesRequest(_message.Message):
    __slots__ = ("citizen_id", "source", "open_only", "limit")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPEN_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    source: str
    open_only: bool
    limit: int
    def __init__(self, citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., open_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListDisputesResponse(_message.Message):
    __slots__ = ("disputes",)
    DISPUTES_FIELD_NUMBER: _ClassVar[int]
    disputes: _containers.RepeatedCompositeFieldContainer[Dispute]
    def __init__(self, disputes: _Optional[_Iterable[_Union[Dispute, _Mapping]]] = ...) -> None: ...

class AnswerDisputeRequest(_message.Message):
    __slots__ = ("dispute_id", "answer", "date", "value", "note", "source")
    class Answer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ANSWER_UNSPECIFIED: _ClassVar[AnswerDisputeRequest.Answer]
        CONFIRM: _ClassVar[AnswerDisputeRequest.Answer]
        CORRECT: _ClassVar[AnswerDisputeRequest.Answer]
        WITHDRAW: _ClassVar[AnswerDisputeRequest.Answer]
    ANSWER_UNSPECIFIED: AnswerDisputeRequest.Answer
    CONFIRM: AnswerDisputeRequest.Answer
    CORRECT: AnswerDisputeRequest.Answer
    WITHDRAW: AnswerDisputeRequest.Answer
    DISPUTE_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    dispute_id: str
    answer: AnswerDisputeRequest.Answer
    date: str
    value: float
    note: str
    source: str
    def __init__(self, dispute_id: _Optional[str] = ..., answer: _Optional[_Union[AnswerDisputeRequest.Answer, str]] = ..., date: _Optional[str] = ..., value: _Optional[float] = ..., note: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ApplyRepairRequest(_message.Message):
    __slots__ = ("citizen_id", "source", "record_id", "statement")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    source: str
    record_id: str
    statement: str
    def __init__(self, citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., record_id: _Optional[str] = ..., statement: _Optional[str] = ...) -> None: ...

class RepairApplication(_message.Message):
    __slots__ = ("repair_id", "citizen_id", "source", "record_id", "variable", "tier", "statement", "state", "filed_at", "due_at", "due_date", "overdue", "escalated_at", "decided_at", "decided_by", "decision_reason", "record_status", "record_version", "position", "event_id")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[RepairApplication.State]
        PENDING: _ClassVar[RepairApplication.State]
        APPROVED: _ClassVar[RepairApplication.State]
        REJECTED: _ClassVar[RepairApplication.State]
    STATE_UNSPECIFIED: RepairApplication.State
    PENDING: RepairApplication.State
    APPROVED: RepairApplication.State
    REJECTED: RepairApplication.State
    REPAIR_ID_FIELD_NUMBER: _ClassVar[int]
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILED_AT_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_FIELD_NUMBER: _ClassVar[int]
    DUE_DATE_FIELD_NUMBER: _ClassVar[int]
    OVERDUE_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    RECORD_STATUS_FIELD_NUMBER: _ClassVar[int]
    RECORD_VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    repair_id: str
    citizen_id: str
    source: str
    record_id: str
    variable: str
    tier: str
    statement: str
    state: RepairApplication.State
    filed_at: _timestamp_pb2.Timestamp
    due_at: _timestamp_pb2.Timestamp
    due_date: str
    overdue: bool
    escalated_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    decided_by: str
    decision_reason: str
    record_status: str
    record_version: int
    position: int
    event_id: str
    def __init__(self, repair_id: _Optional[str] = ..., citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., record_id: _Optional[str] = ..., variable: _Optional[str] = ..., tier: _Optional[str] = ..., statement: _Optional[str] = ..., state: _Optional[_Union[RepairApplication.State, str]] = ..., filed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., due_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., due_date: _Optional[str] = ..., overdue: _Optional[bool] = ..., escalated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., decision_reason: _Optional[str] = ..., record_status: _Optional[str] = ..., record_version: _Optional[int] = ..., position: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class ListRepairsRequest(_message.Message):
    __slots__ = ("citizen_id", "source", "pending_only", "limit")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PENDING_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    source: str
    pending_only: bool
    limit: int
    def __init__(self, citizen_id: _Optional[str] = ..., source: _Optional[str] = ..., pending_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListRepairsResponse(_message.Message):
    __slots__ = ("applications",)
    APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    applications: _containers.RepeatedCompositeFieldContainer[RepairApplication]
    def __init__(self, applications: _Optional[_Iterable[_Union[RepairApplication, _Mapping]]] = ...) -> None: ...

class DecideRepairRequest(_message.Message):
    __slots__ = ("repair_id", "decision", "reason", "source")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[DecideRepairRequest.Decision]
        APPROVE: _ClassVar[DecideRepairRequest.Decision]
        REJECT: _ClassVar[DecideRepairRequest.Decision]
    DECISION_UNSPECIFIED: DecideRepairRequest.Decision
    APPROVE: DecideRepairRequest.Decision
    REJECT: DecideRepairRequest.Decision
    REPAIR_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    repair_id: str
    decision: DecideRepairRequest.Decision
    reason: str
    source: str
    def __init__(self, repair_id: _Optional[str] = ..., decision: _Optional[_Union[DecideRepairRequest.Decision, str]] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AdvanceTestClockRequest(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: int
    def __init__(self, seconds: _Optional[int] = ...) -> None: ...

class TestClock(_message.Message):
    __slots__ = ("now", "offset_seconds", "today")
    NOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TODAY_FIELD_NUMBER: _ClassVar[int]
    now: _timestamp_pb2.Timestamp
    offset_seconds: int
    today: str
    def __init__(self, now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., offset_seconds: _Optional[int] = ..., today: _Optional[str] = ...) -> None: ...
