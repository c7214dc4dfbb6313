from bon_gateway.v1 import best_of_n_pb2 as _best_of_n_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerScoreRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "candidates", "steps", "activation", "group_id", "keep_candidates", "raw", "truncate_prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_best_of_n_pb2.ChatMessage]
    candidates: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedCompositeFieldContainer[_best_of_n_pb2.StepList]
    activation: str
    group_id: str
    keep_candidates: bool
    raw: _containers.RepeatedCompositeFieldContainer[RawInput]
    truncate_prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_best_of_n_pb2.ChatMessage, _Mapping]]] = ..., candidates: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[_Union[_best_of_n_pb2.StepList, _Mapping]]] = ..., activation: _Optional[str] = ..., group_id: _Optional[str] = ..., keep_candidates: _Optional[bool] = ..., raw: _Optional[_Iterable[_Union[RawInput, _Mapping]]] = ..., truncate_prompt_tokens: _Optional[int] = ...) -> None: ...

class RawInput(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerScore(_message.Message):
    __slots__ = ("reward", "step_rewards", "tokens", "logits", "labels")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    reward: float
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    logits: _containers.RepeatedScalarFieldContainer[float]
    labels: int
    def __init__(self, reward: _Optional[float] = ..., step_rewards: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ..., logits: _Optional[_Iterable[float]] = ..., labels: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds", "batch_size", "batch_tokens", "padded_tokens", "reused_prompt_tokens", "cache_bytes", "cache_entries")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PADDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    batch_size: int
    batch_tokens: int
    padded_tokens: int
    reused_prompt_tokens: int
    cache_bytes: int
    cache_entries: int
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., padded_tokens: _Optional[int] = ..., reused_prompt_tokens: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_entries: _Optional[int] = ...) -> None: ...

class WorkerScoreResponse(_message.Message):
    __slots__ = ("scores", "prompt_tokens", "total_tokens", "stats")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[WorkerScore]
    prompt_tokens: int
    total_tokens: int
    stats: WorkerStats
    def __init__(self, scores: _Optional[_Iterable[_Union[WorkerScore, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., stats: _Optional[_Union[WorkerStats, _Mapping]] = ...) -> None: ...

class WorkerOpenGroupRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "ttl_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_best_of_n_pb2.ChatMessage]
    ttl_s: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_best_of_n_pb2.ChatMessage, _Mapping]]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class WorkerOpenGroupResponse(_message.Message):
    __slots__ = ("group_id", "prompt_tokens", "kept")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    prompt_tokens: int
    kept: bool
    def __init__(self, group_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., kept: _Optional[bool] = ...) -> None: ...

class WorkerCloseGroupRequest(_message.Message):
    __slots__ = ("model", "group_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    group_id: str
    def __init__(self, model: _Optional[str] = ..., group_id: _Optional[str] = ...) -> None: ...

class WorkerCloseGroupResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerModel(_message.Message):
    __slots__ = ("name", "architecture", "kind", "max_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    kind: str
    max_length: int
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., kind: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class BackendServer(_message.Message):
    __slots__ = ("model", "server", "up", "in_flight", "calls", "latency_counts", "latency_sum", "errors")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SUM_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    server: str
    up: bool
    in_flight: int
    calls: int
    latency_counts: _containers.RepeatedScalarFieldContainer[int]
    latency_sum: float
    errors: _containers.ScalarMap[str, int]
    def __init__(self, model: _Optional[str] = ..., server: _Optional[str] = ..., up: _Optional[bool] = ..., in_flight: _Optional[int] = ..., calls: _Optional[int] = ..., latency_counts: _Optional[_Iterable[int]] = ..., latency_sum: _Optional[float] = ..., errors: _Optional[_Mapping[str, int]] = ...) -> None: ...

class WorkerInfoResponse(_message.Message):
    __slots__ = ("models", "device", "pid", "groups_scored", "backend_servers")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_SCORED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_SERVERS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[WorkerModel]
    device: str
    pid: int
    groups_scored: int
    backend_servers: _containers.RepeatedCompositeFieldContainer[BackendServer]
    def __init__(self, models: _Optional[_Iterable[_Union[WorkerModel, _Mapping]]] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ..., groups_scored: _Optional[int] = ..., backend_servers: _Optional[_Iterable[_Union[BackendServer, _Mapping]]] = ...) -> None: ...
