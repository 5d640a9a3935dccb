from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    ALLOW: _ClassVar[Outcome]
    DENY_BELOW_THRESHOLD: _ClassVar[Outcome]
    DENY_HARD_RULE: _ClassVar[Outcome]
    DENY_UNPAID_DEFAULT: _ClassVar[Outcome]
    UNKNOWN_CARD: _ClassVar[Outcome]
    NOT_AUTHORISED: _ClassVar[Outcome]
    UNDER_18: _ClassVar[Outcome]
    INVALID_REQUEST: _ClassVar[Outcome]
    UNKNOWN_SCENARIO: _ClassVar[Outcome]
    SCENARIO_NOT_PERMITTED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
ALLOW: Outcome
DENY_BELOW_THRESHOLD: Outcome
DENY_HARD_RULE: Outcome
DENY_UNPAID_DEFAULT: Outcome
UNKNOWN_CARD: Outcome
NOT_AUTHORISED: Outcome
UNDER_18: Outcome
INVALID_REQUEST: Outcome
UNKNOWN_SCENARIO: Outcome
SCENARIO_NOT_PERMITTED: Outcome

class CheckRequest(_message.Message):
    __slots__ = ("scenario", "card_token", "request_id")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    card_token: bytes
    request_id: int
    def __init__(self, scenario: _Optional[str] = ..., card_token: _Optional[bytes] = ..., request_id: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("outcome", "allowed", "reason_codes", "decision_id", "model_version", "scenario", "request_id", "calibration_version", "rules_version", "records_position", "as_of_date", "detail")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODES_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_POSITION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    allowed: bool
    reason_codes: _containers.RepeatedScalarFieldContainer[str]
    decision_id: str
    model_version: str
    scenario: str
    request_id: int
    calibration_version: str
    rules_version: str
    records_position: int
    as_of_date: str
    detail: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., allowed: _Optional[bool] = ..., reason_codes: _Optional[_Iterable[str]] = ..., decision_id: _Optional[str] = ..., model_version: _Optional[str] = ..., scenario: _Optional[str] = ..., request_id: _Optional[int] = ..., calibration_version: _Optional[str] = ..., rules_version: _Optional[str] = ..., records_position: _Optional[int] = ..., as_of_date: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class BatchCheckRequest(_message.Message):
    __slots__ = ("scenario", "card_tokens")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    card_tokens: bytes
    def __init__(self, scenario: _Optional[str] = ..., card_tokens: _Optional[bytes] = ...) -> None: ...

class BatchCheckResponse(_message.Message):
    __slots__ = ("outcomes", "batch_id", "model_version", "scenario", "count", "allowed", "calibration_version", "rules_version", "records_position", "as_of_date")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_POSITION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DATE_FIELD_NUMBER: _ClassVar[int]
    outcomes: bytes
    batch_id: str
    model_version: str
    scenario: str
    count: int
    allowed: int
    calibration_version: str
    rules_version: str
    records_position: int
    as_of_date: str
    def __init__(self, outcomes: _Optional[bytes] = ..., batch_id: _Optional[str] = ..., model_version: _Optional[str] = ..., scenario: _Optional[str] = ..., count: _Optional[int] = ..., allowed: _Optional[int] = ..., calibration_version: _Optional[str] = ..., rules_version: _Optional[str] = ..., records_position: _Optional[int] = ..., as_of_date: _Optional[str] = ...) -> None: ...

class ListScenariosRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Scenario(_message.Message):
    __slots__ = ("name", "name_zh", "name_en", "min_score", "pay_later", "rules_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_ZH_FIELD_NUMBER: _ClassVar[int]
    NAME_EN_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    PAY_LATER_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    name_zh: str
    name_en: str
    min_score: int
    pay_later: bool
    rules_version: str
    def __init__(self, name: _Optional[str] = ..., name_zh: _Optional[str] = ..., name_en: _Optional[str] = ..., min_score: _Optional[int] = ..., pay_later: _Optional[bool] = ..., rules_version: _Optional[str] = ...) -> None: ...

class ListScenariosResponse(_message.Message):
    __slots__ = ("scenarios",)
    SCENARIOS_FIELD_NUMBER: _ClassVar[int]
    scenarios: _containers.RepeatedCompositeFieldContainer[Scenario]
    def __init__(self, scenarios: _Optional[_Iterable[_Union[Scenario, _Mapping]]] = ...) -> None: ...
