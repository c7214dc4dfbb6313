from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "prompt", "model", "best_of", "n", "reward_model", "sampling", "selection", "aggregation", "return_candidates", "min_candidates", "strategy", "rejection_rate", "checkpoints")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    RETURN_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MIN_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REJECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: str
    model: str
    best_of: int
    n: int
    reward_model: str
    sampling: SamplingParams
    selection: str
    aggregation: str
    return_candidates: bool
    min_candidates: int
    strategy: str
    rejection_rate: float
    checkpoints: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., model: _Optional[str] = ..., best_of: _Optional[int] = ..., n: _Optional[int] = ..., reward_model: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., selection: _Optional[str] = ..., aggregation: _Optional[str] = ..., return_candidates: _Optional[bool] = ..., min_candidates: _Optional[int] = ..., strategy: _Optional[str] = ..., rejection_rate: _Optional[float] = ..., checkpoints: _Optional[_Iterable[int]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("index", "text", "reward", "step_rewards", "finish_reason", "rank", "answer")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    reward: float
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    rank: int
    answer: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., reward: _Optional[float] = ..., step_rewards: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., rank: _Optional[int] = ..., answer: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "candidates_generated")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    candidates_generated: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., candidates_generated: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("generate_seconds", "score_seconds", "select_seconds", "total_seconds")
    GENERATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    generate_seconds: float
    score_seconds: float
    select_seconds: float
    total_seconds: float
    def __init__(self, generate_seconds: _Optional[float] = ..., score_seconds: _Optional[float] = ..., select_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("id", "model", "reward_model", "candidates", "usage", "timings", "candidates_dropped", "drop_reasons", "selected_answer", "vote_share", "rejected")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROP_REASONS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    VOTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    reward_model: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    usage: Usage
    timings: Timings
    candidates_dropped: int
    drop_reasons: _containers.RepeatedScalarFieldContainer[str]
    selected_answer: str
    vote_share: float
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedCandidate]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., reward_model: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., candidates_dropped: _Optional[int] = ..., drop_reasons: _Optional[_Iterable[str]] = ..., selected_answer: _Optional[str] = ..., vote_share: _Optional[float] = ..., rejected: _Optional[_Iterable[_Union[RejectedCandidate, _Mapping]]] = ...) -> None: ...

class RejectedCandidate(_message.Message):
    __slots__ = ("index", "text", "reward", "tokens", "checkpoint")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    reward: float
    tokens: int
    checkpoint: int
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., reward: _Optional[float] = ..., tokens: _Optional[int] = ..., checkpoint: _Optional[int] = ...) -> None: ...

class CheckpointScored(_message.Message):
    __slots__ = ("tokens", "scored", "rejected", "seconds")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    scored: _containers.RepeatedCompositeFieldContainer[CandidateScored]
    rejected: _containers.RepeatedScalarFieldContainer[int]
    seconds: float
    def __init__(self, tokens: _Optional[int] = ..., scored: _Optional[_Iterable[_Union[CandidateScored, _Mapping]]] = ..., rejected: _Optional[_Iterable[int]] = ..., seconds: _Optional[float] = ...) -> None: ...

class CandidateGenerated(_message.Message):
    __slots__ = ("index", "text", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    finish_reason: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class CandidateScored(_message.Message):
    __slots__ = ("index", "reward", "step_rewards")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    reward: float
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., reward: _Optional[float] = ..., step_rewards: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("generated", "scored", "result", "checkpoint")
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    generated: CandidateGenerated
    scored: CandidateScored
    result: GenerateResponse
    checkpoint: CheckpointScored
    def __init__(self, generated: _Optional[_Union[CandidateGenerated, _Mapping]] = ..., scored: _Optional[_Union[CandidateScored, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointScored, _Mapping]] = ...) -> None: ...

class StepList(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, steps: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("reward_model", "messages", "candidates", "steps", "aggregation", "selection", "activation")
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    reward_model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    candidates: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedCompositeFieldContainer[StepList]
    aggregation: str
    selection: str
    activation: str
    def __init__(self, reward_model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., candidates: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[_Union[StepList, _Mapping]]] = ..., aggregation: _Optional[str] = ..., selection: _Optional[str] = ..., activation: _Optional[str] = ...) -> None: ...

class ScoredCandidate(_message.Message):
    __slots__ = ("index", "reward", "step_rewards", "answer")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    index: int
    reward: float
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    answer: str
    def __init__(self, index: _Optional[int] = ..., reward: _Optional[float] = ..., step_rewards: _Optional[_Iterable[float]] = ..., answer: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("reward_model", "data", "usage", "selected_index", "selected_answer", "vote_share")
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SELECTED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    VOTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    reward_model: str
    data: _containers.RepeatedCompositeFieldContainer[ScoredCandidate]
    usage: Usage
    selected_index: int
    selected_answer: str
    vote_share: float
    def __init__(self, reward_model: _Optional[str] = ..., data: _Optional[_Iterable[_Union[ScoredCandidate, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., selected_index: _Optional[int] = ..., selected_answer: _Optional[str] = ..., vote_share: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "architecture")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    architecture: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., architecture: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
