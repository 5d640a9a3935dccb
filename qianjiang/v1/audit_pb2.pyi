import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplayDecisionRequest(_message.Message):
    __slots__ = ("decision_id",)
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    def __init__(self, decision_id: _Optional[str] = ...) -> None: ...

class Replay(_message.Message):
    __slots__ = ("original", "replayed_result", "matches", "score", "level", "hard_rule_applied", "reason_codes")
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_RESULT_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    HARD_RULE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODES_FIELD_NUMBER: _ClassVar[int]
    original: CheckEntry
    replayed_result: str
    matches: bool
    score: int
    level: str
    hard_rule_applied: bool
    reason_codes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, original: _Optional[_Union[CheckEntry, _Mapping]] = ..., replayed_result: _Optional[str] = ..., matches: _Optional[bool] = ..., score: _Optional[int] = ..., level: _Optional[str] = ..., hard_rule_applied: _Optional[bool] = ..., reason_codes: _Optional[_Iterable[str]] = ...) -> None: ...

class ListChecksRequest(_message.Message):
    __slots__ = ("citizen_id", "limit")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    limit: int
    def __init__(self, citizen_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class CheckEntry(_message.Message):
    __slots__ = ("decision_id", "time", "caller", "method", "scenario", "result", "model_version", "calibration_version", "rules_version", "records_position", "as_of_date", "by_the_citizen")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_POSITION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DATE_FIELD_NUMBER: _ClassVar[int]
    BY_THE_CITIZEN_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    time: _timestamp_pb2.Timestamp
    caller: str
    method: str
    scenario: str
    result: str
    model_version: str
    calibration_version: str
    rules_version: str
    records_position: int
    as_of_date: str
    by_the_citizen: bool
    def __init__(self, decision_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., caller: _Optional[str] = ..., method: _Optional[str] = ..., scenario: _Optional[str] = ..., result: _Optional[str] = ..., model_version: _Optional[str] = ..., calibration_version: _Optional[str] = ..., rules_version: _Optional[str] = ..., records_position: _Optional[int] = ..., as_of_date: _Optional[str] = ..., by_the_citizen: _Optional[bool] = ...) -> None: ...

class ListChecksResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CheckEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[CheckEntry, _Mapping]]] = ...) -> None: ...
