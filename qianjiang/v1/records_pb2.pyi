import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Record(_message.Message):
    __slots__ = ("record_id", "citizen_id", "variable", "date", "value", "source", "scenario")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    citizen_id: str
    variable: str
    date: str
    value: float
    source: str
    scenario: str
    def __init__(self, record_id: _Optional[str] = ..., citizen_id: _Optional[str] = ..., variable: _Optional[str] = ..., date: _Optional[str] = ..., value: _Optional[float] = ..., source: _Optional[str] = ..., scenario: _Optional[str] = ...) -> None: ...

class RecordAck(_message.Message):
    __slots__ = ("record_id", "status", "source", "version", "position")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[RecordAck.Status]
        ACCEPTED: _ClassVar[RecordAck.Status]
        DUPLICATE: _ClassVar[RecordAck.Status]
        UPDATED: _ClassVar[RecordAck.Status]
    STATUS_UNSPECIFIED: RecordAck.Status
    ACCEPTED: RecordAck.Status
    DUPLICATE: RecordAck.Status
    UPDATED: RecordAck.Status
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    status: RecordAck.Status
    source: str
    version: int
    position: int
    def __init__(self, record_id: _Optional[str] = ..., status: _Optional[_Union[RecordAck.Status, str]] = ..., source: _Optional[str] = ..., version: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class CorrectRecordRequest(_message.Message):
    __slots__ = ("record_id", "date", "value", "source")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    date: str
    value: float
    source: str
    def __init__(self, record_id: _Optional[str] = ..., date: _Optional[str] = ..., value: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class WithdrawRecordRequest(_message.Message):
    __slots__ = ("record_id", "why", "source")
    class Why(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WHY_UNSPECIFIED: _ClassVar[WithdrawRecordRequest.Why]
        WITHDRAWN: _ClassVar[WithdrawRecordRequest.Why]
        REPAIRED: _ClassVar[WithdrawRecordRequest.Why]
    WHY_UNSPECIFIED: WithdrawRecordRequest.Why
    WITHDRAWN: WithdrawRecordRequest.Why
    REPAIRED: WithdrawRecordRequest.Why
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    why: WithdrawRecordRequest.Why
    source: str
    def __init__(self, record_id: _Optional[str] = ..., why: _Optional[_Union[WithdrawRecordRequest.Why, str]] = ..., source: _Optional[str] = ...) -> None: ...

class RecordHistoryRequest(_message.Message):
    __slots__ = ("record_id", "source")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    source: str
    def __init__(self, record_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class RecordVersion(_message.Message):
    __slots__ = ("version", "date", "value", "status", "variable", "scenario", "received_at", "sent_by", "position")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SENT_BY_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    version: int
    date: str
    value: float
    status: str
    variable: str
    scenario: str
    received_at: _timestamp_pb2.Timestamp
    sent_by: str
    position: int
    def __init__(self, version: _Optional[int] = ..., date: _Optional[str] = ..., value: _Optional[float] = ..., status: _Optional[str] = ..., variable: _Optional[str] = ..., scenario: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sent_by: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class RecordHistory(_message.Message):
    __slots__ = ("record_id", "source", "versions")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    source: str
    versions: _containers.RepeatedCompositeFieldContainer[RecordVersion]
    def __init__(self, record_id: _Optional[str] = ..., source: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[RecordVersion, _Mapping]]] = ...) -> None: ...

class ConsentRequest(_message.Message):
    __slots__ = ("citizen_id", "purposes", "expires")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    expires: str
    def __init__(self, citizen_id: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ..., expires: _Optional[str] = ...) -> None: ...

class PurposeConsent(_message.Message):
    __slots__ = ("purpose", "authorised", "setting", "expires")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    AUTHORISED_FIELD_NUMBER: _ClassVar[int]
    SETTING_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    authorised: bool
    setting: str
    expires: str
    def __init__(self, purpose: _Optional[str] = ..., authorised: _Optional[bool] = ..., setting: _Optional[str] = ..., expires: _Optional[str] = ...) -> None: ...

class ConsentState(_message.Message):
    __slots__ = ("citizen_id", "granted", "purposes")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    granted: bool
    purposes: _containers.RepeatedCompositeFieldContainer[PurposeConsent]
    def __init__(self, citizen_id: _Optional[str] = ..., granted: _Optional[bool] = ..., purposes: _Optional[_Iterable[_Union[PurposeConsent, _Mapping]]] = ...) -> None: ...

class Citizen(_message.Message):
    __slots__ = ("citizen_id", "birth_date")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    BIRTH_DATE_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    birth_date: str
    def __init__(self, citizen_id: _Optional[str] = ..., birth_date: _Optional[str] = ...) -> None: ...

class CitizenAck(_message.Message):
    __slots__ = ("citizen_id", "created")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    created: bool
    def __init__(self, citizen_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class RegisterCardRequest(_message.Message):
    __slots__ = ("citizen_id", "card_token")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    card_token: bytes
    def __init__(self, citizen_id: _Optional[str] = ..., card_token: _Optional[bytes] = ...) -> None: ...

class RegisterCardResponse(_message.Message):
    __slots__ = ("citizen_id", "created")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    created: bool
    def __init__(self, citizen_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...
