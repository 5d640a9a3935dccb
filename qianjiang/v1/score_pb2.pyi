import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from qianjiang.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetScoreRequest(_message.Message):
    __slots__ = ("citizen_id", "purpose")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    purpose: str
    def __init__(self, citizen_id: _Optional[str] = ..., purpose: _Optional[str] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("citizen_id", "score", "level", "level_zh", "percentile", "raw_points", "dimensions", "reasons", "hard_rule_applied", "model_version", "calibration_version", "computed_at", "disclosure_id", "records_position", "as_of_date")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_ZH_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    RAW_POINTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    HARD_RULE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_POSITION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DATE_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    score: int
    level: _common_pb2.Level
    level_zh: str
    percentile: float
    raw_points: float
    dimensions: _containers.RepeatedCompositeFieldContainer[_common_pb2.DimensionPoints]
    reasons: _containers.RepeatedCompositeFieldContainer[_common_pb2.Reason]
    hard_rule_applied: bool
    model_version: str
    calibration_version: str
    computed_at: _timestamp_pb2.Timestamp
    disclosure_id: str
    records_position: int
    as_of_date: str
    def __init__(self, citizen_id: _Optional[str] = ..., score: _Optional[int] = ..., level: _Optional[_Union[_common_pb2.Level, str]] = ..., level_zh: _Optional[str] = ..., percentile: _Optional[float] = ..., raw_points: _Optional[float] = ..., dimensions: _Optional[_Iterable[_Union[_common_pb2.DimensionPoints, _Mapping]]] = ..., reasons: _Optional[_Iterable[_Union[_common_pb2.Reason, _Mapping]]] = ..., hard_rule_applied: _Optional[bool] = ..., model_version: _Optional[str] = ..., calibration_version: _Optional[str] = ..., computed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disclosure_id: _Optional[str] = ..., records_position: _Optional[int] = ..., as_of_date: _Optional[str] = ...) -> None: ...

class VariableContribution(_message.Message):
    __slots__ = ("variable", "dimension", "direction", "feature", "points", "best_points", "weight", "weighted_points", "points_lost", "disputed", "suspended")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BEST_POINTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_POINTS_FIELD_NUMBER: _ClassVar[int]
    POINTS_LOST_FIELD_NUMBER: _ClassVar[int]
    DISPUTED_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    variable: str
    dimension: str
    direction: str
    feature: float
    points: float
    best_points: float
    weight: float
    weighted_points: float
    points_lost: float
    disputed: bool
    suspended: bool
    def __init__(self, variable: _Optional[str] = ..., dimension: _Optional[str] = ..., direction: _Optional[str] = ..., feature: _Optional[float] = ..., points: _Optional[float] = ..., best_points: _Optional[float] = ..., weight: _Optional[float] = ..., weighted_points: _Optional[float] = ..., points_lost: _Optional[float] = ..., disputed: _Optional[bool] = ..., suspended: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("score", "variables")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    score: Score
    variables: _containers.RepeatedCompositeFieldContainer[VariableContribution]
    def __init__(self, score: _Optional[_Union[Score, _Mapping]] = ..., variables: _Optional[_Iterable[_Union[VariableContribution, _Mapping]]] = ...) -> None: ...

class BatchGetScoresRequest(_message.Message):
    __slots__ = ("citizen_ids", "purpose")
    CITIZEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    citizen_ids: _containers.RepeatedScalarFieldContainer[str]
    purpose: str
    def __init__(self, citizen_ids: _Optional[_Iterable[str]] = ..., purpose: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("citizen_id", "status", "score")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[ScoreResult.Status]
        OK: _ClassVar[ScoreResult.Status]
        NOT_FOUND: _ClassVar[ScoreResult.Status]
        NOT_AUTHORISED: _ClassVar[ScoreResult.Status]
        UNDER_18: _ClassVar[ScoreResult.Status]
    STATUS_UNSPECIFIED: ScoreResult.Status
    OK: ScoreResult.Status
    NOT_FOUND: ScoreResult.Status
    NOT_AUTHORISED: ScoreResult.Status
    UNDER_18: ScoreResult.Status
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    status: ScoreResult.Status
    score: Score
    def __init__(self, citizen_id: _Optional[str] = ..., status: _Optional[_Union[ScoreResult.Status, str]] = ..., score: _Optional[_Union[Score, _Mapping]] = ...) -> None: ...

class BatchGetScoresResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class SimulatedChange(_message.Message):
    __slots__ = ("remove_record", "remove_variable", "add_record")
    REMOVE_RECORD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_VARIABLE_FIELD_NUMBER: _ClassVar[int]
    ADD_RECORD_FIELD_NUMBER: _ClassVar[int]
    remove_record: RecordRef
    remove_variable: str
    add_record: HypotheticalRecord
    def __init__(self, remove_record: _Optional[_Union[RecordRef, _Mapping]] = ..., remove_variable: _Optional[str] = ..., add_record: _Optional[_Union[HypotheticalRecord, _Mapping]] = ...) -> None: ...

class RecordRef(_message.Message):
    __slots__ = ("record_id", "source")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    source: str
    def __init__(self, record_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class HypotheticalRecord(_message.Message):
    __slots__ = ("variable", "value", "date", "count")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    variable: str
    value: float
    date: str
    count: int
    def __init__(self, variable: _Optional[str] = ..., value: _Optional[float] = ..., date: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class SimulateScoreRequest(_message.Message):
    __slots__ = ("citizen_id", "purpose", "changes", "next_level")
    CITIZEN_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_LEVEL_FIELD_NUMBER: _ClassVar[int]
    citizen_id: str
    purpose: str
    changes: _containers.RepeatedCompositeFieldContainer[SimulatedChange]
    next_level: bool
    def __init__(self, citizen_id: _Optional[str] = ..., purpose: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[SimulatedChange, _Mapping]]] = ..., next_level: _Optional[bool] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("variable", "repair", "amount", "record_id", "source", "improve_zh", "improve_en", "changes")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    IMPROVE_ZH_FIELD_NUMBER: _ClassVar[int]
    IMPROVE_EN_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    variable: str
    repair: bool
    amount: float
    record_id: str
    source: str
    improve_zh: str
    improve_en: str
    changes: _containers.RepeatedCompositeFieldContainer[SimulatedChange]
    def __init__(self, variable: _Optional[str] = ..., repair: _Optional[bool] = ..., amount: _Optional[float] = ..., record_id: _Optional[str] = ..., source: _Optional[str] = ..., improve_zh: _Optional[str] = ..., improve_en: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[SimulatedChange, _Mapping]]] = ...) -> None: ...

class NextLevel(_message.Message):
    __slots__ = ("level", "min_score", "reachable", "actions", "score", "candidates_tried")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_TRIED_FIELD_NUMBER: _ClassVar[int]
    level: _common_pb2.Level
    min_score: int
    reachable: bool
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    score: Score
    candidates_tried: int
    def __init__(self, level: _Optional[_Union[_common_pb2.Level, str]] = ..., min_score: _Optional[int] = ..., reachable: _Optional[bool] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., score: _Optional[_Union[Score, _Mapping]] = ..., candidates_tried: _Optional[int] = ...) -> None: ...

class Simulation(_message.Message):
    __slots__ = ("current", "simulated", "delta", "next_level")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NEXT_LEVEL_FIELD_NUMBER: _ClassVar[int]
    current: Score
    simulated: Score
    delta: int
    next_level: NextLevel
    def __init__(self, current: _Optional[_Union[Score, _Mapping]] = ..., simulated: _Optional[_Union[Score, _Mapping]] = ..., delta: _Optional[int] = ..., next_level: _Optional[_Union[NextLevel, _Mapping]] = ...) -> None: ...
