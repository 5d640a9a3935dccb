import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListChecksRequest(_message.Message):
    __slots__ = ("citizen_id", "limit")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    limit: int
    def __init__(self, citizen_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class CheckEntry(_message.Message):
    __slots__ = ("decision_id", "time", "caller", "method", "scenario", "result", "model_version")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    time: _timestamp_pb2.Timestamp
    caller: str
    method: str
    scenario: str
    result: str
    model_version: str
    def __init__(self, decision_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., caller: _Optional[str] = ..., method: _Optional[str] = ..., scenario: _Optional[str] = ..., result: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListChecksResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CheckEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[CheckEntry, _Mapping]]] = ...) -> None: ...
