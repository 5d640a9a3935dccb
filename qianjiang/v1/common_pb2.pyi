from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEVEL_UNSPECIFIED: _ClassVar[Level]
    NEEDS_IMPROVEMENT: _ClassVar[Level]
    FAIR: _ClassVar[Level]
    GOOD: _ClassVar[Level]
    EXCELLENT: _ClassVar[Level]
    OUTSTANDING: _ClassVar[Level]
LEVEL_UNSPECIFIED: Level
NEEDS_IMPROVEMENT: Level
FAIR: Level
GOOD: Level
EXCELLENT: Level
OUTSTANDING: Level

class DimensionPoints(_message.Message):
    __slots__ = ("dimension", "name_zh", "name_en", "points", "weight")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    NAME_ZH_FIELD_NUMBER: _ClassVar[int]
    NAME_EN_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    name_zh: str
    name_en: str
    points: float
    weight: float
    def __init__(self, dimension: _Optional[str] = ..., name_zh: _Optional[str] = ..., name_en: _Optional[str] = ..., points: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "variable", "text_zh", "text_en", "improve_zh", "improve_en", "points_lost")
    CODE_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_ZH_FIELD_NUMBER: _ClassVar[int]
    TEXT_EN_FIELD_NUMBER: _ClassVar[int]
    IMPROVE_ZH_FIELD_NUMBER: _ClassVar[int]
    IMPROVE_EN_FIELD_NUMBER: _ClassVar[int]
    POINTS_LOST_FIELD_NUMBER: _ClassVar[int]
    code: str
    variable: str
    text_zh: str
    text_en: str
    improve_zh: str
    improve_en: str
    points_lost: float
    def __init__(self, code: _Optional[str] = ..., variable: _Optional[str] = ..., text_zh: _Optional[str] = ..., text_en: _Optional[str] = ..., improve_zh: _Optional[str] = ..., improve_en: _Optional[str] = ..., points_lost: _Optional[float] = ...) -> None: ...
