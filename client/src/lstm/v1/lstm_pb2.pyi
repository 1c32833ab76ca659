from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UnknownCharacters(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN_CHARACTERS_UNSPECIFIED: _ClassVar[UnknownCharacters]
    UNKNOWN_CHARACTERS_REJECT: _ClassVar[UnknownCharacters]
    UNKNOWN_CHARACTERS_SKIP: _ClassVar[UnknownCharacters]
    UNKNOWN_CHARACTERS_REPLACE: _ClassVar[UnknownCharacters]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
UNKNOWN_CHARACTERS_UNSPECIFIED: UnknownCharacters
UNKNOWN_CHARACTERS_REJECT: UnknownCharacters
UNKNOWN_CHARACTERS_SKIP: UnknownCharacters
UNKNOWN_CHARACTERS_REPLACE: UnknownCharacters
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "model", "model_version", "tokens_seen", "defaults", "busy", "created_at", "last_used_at", "tenant")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    model_version: int
    tokens_seen: int
    defaults: SamplingParams
    busy: bool
    created_at: float
    last_used_at: float
    tenant: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., tokens_seen: _Optional[int] = ..., defaults: _Optional[_Union[SamplingParams, _Mapping]] = ..., busy: _Optional[bool] = ..., created_at: _Optional[float] = ..., last_used_at: _Optional[float] = ..., tenant: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "defaults", "prompt", "unknown_characters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    defaults: SamplingParams
    prompt: str
    unknown_characters: UnknownCharacters
    def __init__(self, model: _Optional[str] = ..., defaults: _Optional[_Union[SamplingParams, _Mapping]] = ..., prompt: _Optional[str] = ..., unknown_characters: _Optional[_Union[UnknownCharacters, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("model", "model_version", "tokens_seen", "h", "c", "next_logits", "defaults", "tenant", "key_id", "mac")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    NEXT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    tokens_seen: int
    h: Tensor
    c: Tensor
    next_logits: Tensor
    defaults: SamplingParams
    tenant: str
    key_id: str
    mac: bytes
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ..., tokens_seen: _Optional[int] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ..., next_logits: _Optional[_Union[Tensor, _Mapping]] = ..., defaults: _Optional[_Union[SamplingParams, _Mapping]] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    def __init__(self, state: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "sampling", "unknown_characters")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    sampling: SamplingParams
    unknown_characters: UnknownCharacters
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., unknown_characters: _Optional[_Union[UnknownCharacters, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tokens_seen", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens_seen: int
    finish_reason: FinishReason
    def __init__(self, text: _Optional[str] = ..., tokens_seen: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("create", "session_id", "text", "sampling", "keep_session")
    CREATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KEEP_SESSION_FIELD_NUMBER: _ClassVar[int]
    create: CreateSessionRequest
    session_id: str
    text: str
    sampling: SamplingParams
    keep_session: bool
    def __init__(self, create: _Optional[_Union[CreateSessionRequest, _Mapping]] = ..., session_id: _Optional[str] = ..., text: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., keep_session: _Optional[bool] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("session_id", "text", "end_of_turn", "finish_reason", "tokens_seen")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    END_OF_TURN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    end_of_turn: bool
    finish_reason: FinishReason
    tokens_seen: int
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., end_of_turn: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., tokens_seen: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model", "text", "tokens", "h", "c", "unknown_characters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    tokens: TokenList
    h: Tensor
    c: Tensor
    unknown_characters: UnknownCharacters
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenList, _Mapping]] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ..., unknown_characters: _Optional[_Union[UnknownCharacters, str]] = ...) -> None: ...

class TokenList(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("h", "c", "probabilities")
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    h: Tensor
    c: Tensor
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, h: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "texts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class ClassifyResult(_message.Message):
    __slots__ = ("label", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: str
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResult, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "task", "vocabulary", "labels", "num_layers", "hidden_size", "num_directions", "backend", "device", "quality")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    task: str
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    num_layers: int
    hidden_size: int
    num_directions: int
    backend: str
    device: str
    quality: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., task: _Optional[str] = ..., vocabulary: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_directions: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., quality: _Optional[str] = ...) -> None: ...

class ListPrefixCacheRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PrefixCacheEntry(_message.Message):
    __slots__ = ("characters", "preview", "bytes", "hits", "idle_seconds")
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    characters: int
    preview: str
    bytes: int
    hits: int
    idle_seconds: float
    def __init__(self, characters: _Optional[int] = ..., preview: _Optional[str] = ..., bytes: _Optional[int] = ..., hits: _Optional[int] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class ListPrefixCacheResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[PrefixCacheEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[PrefixCacheEntry, _Mapping]]] = ...) -> None: ...

class ClearPrefixCacheRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ClearPrefixCacheResponse(_message.Message):
    __slots__ = ("cleared", "cleared_store")
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_STORE_FIELD_NUMBER: _ClassVar[int]
    cleared: int
    cleared_store: int
    def __init__(self, cleared: _Optional[int] = ..., cleared_store: _Optional[int] = ...) -> None: ...
