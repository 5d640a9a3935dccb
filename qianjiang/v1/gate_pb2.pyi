from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetManifestRequest(_message.Message):
    __slots__ = ("scenario",)
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    def __init__(self, scenario: _Optional[str] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("scenario",)
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    def __init__(self, scenario: _Optional[str] = ...) -> None: ...

class GetDeltasRequest(_message.Message):
    __slots__ = ("scenario", "since_sequence")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    since_sequence: int
    def __init__(self, scenario: _Optional[str] = ..., since_sequence: _Optional[int] = ...) -> None: ...

class GateManifest(_message.Message):
    __slots__ = ("body", "signature", "key_id", "latest_sequence")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LATEST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: str
    latest_sequence: int
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., latest_sequence: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("manifest", "part", "offset", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: GateManifest
    part: str
    offset: int
    data: bytes
    def __init__(self, manifest: _Optional[_Union[GateManifest, _Mapping]] = ..., part: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SignedDelta(_message.Message):
    __slots__ = ("body", "signature", "key_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: str
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class OfflineDecision(_message.Message):
    __slots__ = ("gate_sequence", "scenario", "card_token", "allowed", "list_sequence", "decided_at_unix")
    GATE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    LIST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    gate_sequence: int
    scenario: str
    card_token: bytes
    allowed: bool
    list_sequence: int
    decided_at_unix: int
    def __init__(self, gate_sequence: _Optional[int] = ..., scenario: _Optional[str] = ..., card_token: _Optional[bytes] = ..., allowed: _Optional[bool] = ..., list_sequence: _Optional[int] = ..., decided_at_unix: _Optional[int] = ...) -> None: ...

class UploadOfflineDecisionsRequest(_message.Message):
    __slots__ = ("gate_id", "decisions")
    GATE_ID_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    gate_id: str
    decisions: _containers.RepeatedCompositeFieldContainer[OfflineDecision]
    def __init__(self, gate_id: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[OfflineDecision, _Mapping]]] = ...) -> None: ...

class UploadOfflineDecisionsResponse(_message.Message):
    __slots__ = ("written", "already_uploaded", "unknown_cards", "acknowledged_sequence")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ALREADY_UPLOADED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CARDS_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    written: int
    already_uploaded: int
    unknown_cards: int
    acknowledged_sequence: int
    def __init__(self, written: _Optional[int] = ..., already_uploaded: _Optional[int] = ..., unknown_cards: _Optional[int] = ..., acknowledged_sequence: _Optional[int] = ...) -> None: ...
