from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outputs(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUTS_UNSPECIFIED: _ClassVar[Outputs]
    OUTPUTS_BOTH: _ClassVar[Outputs]
    OUTPUTS_SUMMARY: _ClassVar[Outputs]
    OUTPUTS_HEADLINE: _ClassVar[Outputs]

class LongInputPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_INPUT_POLICY_UNSPECIFIED: _ClassVar[LongInputPolicy]
    LONG_INPUT_POLICY_TRUNCATE: _ClassVar[LongInputPolicy]
    LONG_INPUT_POLICY_CHUNK: _ClassVar[LongInputPolicy]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_DEFAULT: _ClassVar[Priority]
    PRIORITY_BULK: _ClassVar[Priority]
OUTPUTS_UNSPECIFIED: Outputs
OUTPUTS_BOTH: Outputs
OUTPUTS_SUMMARY: Outputs
OUTPUTS_HEADLINE: Outputs
LONG_INPUT_POLICY_UNSPECIFIED: LongInputPolicy
LONG_INPUT_POLICY_TRUNCATE: LongInputPolicy
LONG_INPUT_POLICY_CHUNK: LongInputPolicy
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_DEFAULT: Priority
PRIORITY_BULK: Priority

class Article(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("summary_max_tokens", "summary_min_tokens", "headline_max_tokens", "num_beams", "outputs", "headline_min_tokens", "max_input_tokens", "length_penalty", "no_repeat_ngram_size", "long_input")
    SUMMARY_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LONG_INPUT_FIELD_NUMBER: _ClassVar[int]
    summary_max_tokens: int
    summary_min_tokens: int
    headline_max_tokens: int
    num_beams: int
    outputs: Outputs
    headline_min_tokens: int
    max_input_tokens: int
    length_penalty: float
    no_repeat_ngram_size: int
    long_input: LongInputPolicy
    def __init__(self, summary_max_tokens: _Optional[int] = ..., summary_min_tokens: _Optional[int] = ..., headline_max_tokens: _Optional[int] = ..., num_beams: _Optional[int] = ..., outputs: _Optional[_Union[Outputs, str]] = ..., headline_min_tokens: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., length_penalty: _Optional[float] = ..., no_repeat_ngram_size: _Optional[int] = ..., long_input: _Optional[_Union[LongInputPolicy, str]] = ...) -> None: ...

class SummarizeRequest(_message.Message):
    __slots__ = ("articles", "options", "priority")
    ARTICLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    articles: _containers.RepeatedCompositeFieldContainer[Article]
    options: GenerationOptions
    priority: Priority
    def __init__(self, articles: _Optional[_Iterable[_Union[Article, _Mapping]]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class ArticleError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ArticleResult(_message.Message):
    __slots__ = ("id", "summary", "headline", "input_tokens", "truncated", "summary_tokens", "headline_tokens", "error", "chunks")
    ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    id: str
    summary: str
    headline: str
    input_tokens: int
    truncated: bool
    summary_tokens: int
    headline_tokens: int
    error: ArticleError
    chunks: int
    def __init__(self, id: _Optional[str] = ..., summary: _Optional[str] = ..., headline: _Optional[str] = ..., input_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., summary_tokens: _Optional[int] = ..., headline_tokens: _Optional[int] = ..., error: _Optional[_Union[ArticleError, _Mapping]] = ..., chunks: _Optional[int] = ...) -> None: ...

class SummarizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ArticleResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ArticleResult, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("role", "model_id", "family", "model_type", "max_input_tokens", "summary_prefix", "headline_prefix", "dtype", "device")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    role: str
    model_id: str
    family: str
    model_type: str
    max_input_tokens: int
    summary_prefix: str
    headline_prefix: str
    dtype: str
    device: str
    def __init__(self, role: _Optional[str] = ..., model_id: _Optional[str] = ..., family: _Optional[str] = ..., model_type: _Optional[str] = ..., max_input_tokens: _Optional[int] = ..., summary_prefix: _Optional[str] = ..., headline_prefix: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_articles_per_request", "max_article_chars", "max_batch_size", "max_queue", "max_num_beams", "max_new_tokens", "max_chunks_per_article", "max_chunk_depth")
    MAX_ARTICLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_ARTICLE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_ARTICLE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    max_articles_per_request: int
    max_article_chars: int
    max_batch_size: int
    max_queue: int
    max_num_beams: int
    max_new_tokens: int
    max_chunks_per_article: int
    max_chunk_depth: int
    def __init__(self, max_articles_per_request: _Optional[int] = ..., max_article_chars: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_num_beams: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_chunks_per_article: _Optional[int] = ..., max_chunk_depth: _Optional[int] = ...) -> None: ...

class PriorityClass(_message.Message):
    __slots__ = ("priority", "max_queue")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    priority: Priority
    max_queue: int
    def __init__(self, priority: _Optional[_Union[Priority, str]] = ..., max_queue: _Optional[int] = ...) -> None: ...

class Scheduling(_message.Message):
    __slots__ = ("default_priority", "max_priority", "classes", "starvation_bound", "interactive_headroom", "small_bulk_batch")
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    STARVATION_BOUND_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_HEADROOM_FIELD_NUMBER: _ClassVar[int]
    SMALL_BULK_BATCH_FIELD_NUMBER: _ClassVar[int]
    default_priority: Priority
    max_priority: Priority
    classes: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    starvation_bound: int
    interactive_headroom: int
    small_bulk_batch: int
    def __init__(self, default_priority: _Optional[_Union[Priority, str]] = ..., max_priority: _Optional[_Union[Priority, str]] = ..., classes: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., starvation_bound: _Optional[int] = ..., interactive_headroom: _Optional[int] = ..., small_bulk_batch: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("models", "engine", "default_options", "limits", "server_version", "scheduling")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDescription]
    engine: str
    default_options: GenerationOptions
    limits: ServerLimits
    server_version: str
    scheduling: Scheduling
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDescription, _Mapping]]] = ..., engine: _Optional[str] = ..., default_options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., scheduling: _Optional[_Union[Scheduling, _Mapping]] = ...) -> None: ...
