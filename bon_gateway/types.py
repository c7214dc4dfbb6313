"""Plain data types shared by the api, engine, generation and scoring client.

No I/O and no third-party imports: these are what crosses module boundaries
inside the front process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

Selection = Literal["argmax", "weighted_vote", "majority_vote"]
Aggregation = Literal["last", "min", "prod", "mean"]
Activation = Literal["none", "sigmoid", "softmax"]

Strategy = Literal["best_of_n", "speculative_rejection"]

SELECTIONS: tuple[str, ...] = ("argmax", "weighted_vote", "majority_vote")
STRATEGIES: tuple[str, ...] = ("best_of_n", "speculative_rejection")
AGGREGATIONS: tuple[str, ...] = ("last", "min", "prod", "mean")
ACTIVATIONS: tuple[str, ...] = ("none", "sigmoid", "softmax")


# Why a candidate was dropped: a bounded set (the suffix of the
# bon_candidates_total{outcome="dropped_<reason>"} label).
DropReason = Literal[
    "deadline", "timeout", "connect_error", "bad_response", "upstream_error", "rate_limited", "too_large"
]
# Figures of the HTTP scoring backends' servers (backend = "vllm" / "sglang"), counted by
# the reward worker and carried by its Info reply (WorkerInfoResponse.backend_servers) to
# the gateway's metrics: the upper bounds (seconds) of the call latency buckets (then
# +Inf), and the error kinds (the generator upstreams' kinds: one dashboard reads both).
BACKEND_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160,
)  # fmt: skip
BACKEND_ERROR_KINDS: tuple[str, ...] = ("timeout", "connect_error", "http_4xx", "http_5xx", "bad_response")

DROP_REASONS: tuple[str, ...] = (
    "deadline",
    "timeout",
    "connect_error",
    "bad_response",
    "upstream_error",
    "rate_limited",
    "too_large",  # the reply passed generator.max_response_bytes
)


@dataclass(frozen=True, slots=True)
class Deadline:
    """One request's absolute deadline on the `time.monotonic()` clock.

    Made once by the front that admits the request and passed down explicitly:
    every hop (upstream calls, their retries, scoring, the worker RPC) bounds
    itself by the time *left*, never by a fresh full timeout.
    """

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left, never below 0."""
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def earlier(self, seconds: float) -> Deadline:
        """This deadline moved `seconds` earlier (a margin kept for later phases)."""
        return Deadline(self.at - seconds)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A candidate that was not generated: a bounded `reason` and a human `detail`."""

    reason: DropReason
    detail: str
    # rate_limited: how long the upstream asked callers to wait (its Retry-After).
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call an assistant turn makes (OpenAI `tool_calls[i]`); `arguments` is
    the JSON text the model wrote, kept as it came (it may not even be valid JSON)."""

    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    # OpenAI tool calling: an assistant turn's calls (its content may then be null,
    # kept as ""), a tool turn's answer to one call, a participant's name.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def scoring_text(content: str, tool_calls: tuple[ToolCall, ...]) -> str:
    """What the reward model reads of an assistant turn: its content, then one
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>` line per call, the format
    of the Hermes / Qwen2.5 chat templates (so reward models tuned on those see text they
    know). Arguments that are valid JSON are embedded as JSON, others as a string."""
    if not tool_calls:
        return content
    lines = [content] if content else []
    for call in tool_calls:
        try:
            arguments: object = json.loads(call.arguments) if call.arguments else {}
        except (ValueError, RecursionError):
            arguments = call.arguments
        rendered = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
        lines.append(f"<tool_call>{rendered}</tool_call>")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Other OpenAI parameters passed through untouched (e.g. presence_penalty).
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BonRequest:
    """One Best-of-N request, after validation, whatever front it came from."""

    messages: tuple[Message, ...]
    prompt: str | None = None  # plain completion instead of chat
    model: str | None = None  # generator model; None = configured default
    best_of: int = 4
    n: int = 1
    reward_model: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    selection: Selection = "argmax"
    aggregation: Aggregation = "last"
    return_candidates: bool = False
    min_candidates: int | None = None
    request_id: str = ""
    # Search: None / () take the configured defaults ([strategy] in the config).
    strategy: Strategy | None = None
    rejection_rate: float | None = None  # speculative_rejection: share rejected per checkpoint
    checkpoints: tuple[int, ...] = ()  # speculative_rejection: token counts where partials are scored


@dataclass(slots=True)
class Generation:
    """One candidate as returned by the upstream generator."""

    index: int
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    # The upstream's logprobs of the candidate (OpenAI's shape), when the request asked.
    logprobs: dict[str, object] | None = None

    def scoring_text(self) -> str:
        """The whole assistant message as the reward model reads it (tool calls included)."""
        return scoring_text(self.text, self.tool_calls)


@dataclass(frozen=True, slots=True)
class Progress:
    """A live candidate's text so far (sent only to consumers that ask for progress)."""

    index: int
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    """A candidate the upstream finished (its finish_reason came)."""

    generation: Generation


@dataclass(frozen=True, slots=True)
class Failed:
    """A candidate whose call failed for good."""

    index: int
    dropped: Dropped


# What a live generation run yields, candidate by candidate, as the streams go.
GenerationEvent = Progress | Finished | Failed


@dataclass(slots=True)
class ScoredCandidate:
    index: int
    text: str
    reward: float
    step_rewards: tuple[float, ...] = ()
    finish_reason: str = "stop"
    rank: int = 0
    answer: str | None = None
    tokens: int = 0  # generated candidates: the tokens it took (the upstream's count)
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: dict[str, object] | None = None
    # Scoring only: the head's raw logits at each position read (CandidateScore's).
    logits: tuple[float, ...] = ()
    labels: int = 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    candidates_generated: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timings:
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    select_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class RejectedCandidate:
    """A candidate speculative rejection stopped: its text so far and the reward that sank it."""

    index: int
    text: str
    reward: float
    tokens: int
    checkpoint: int  # the token count of the checkpoint that rejected it


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """One checkpoint of speculative rejection: who was scored, with what, and who was rejected."""

    tokens: int
    rewards: tuple[tuple[int, float], ...]  # (candidate index, reward), finished ones on their whole text
    rejected: tuple[int, ...]
    seconds: float  # scoring time of the partial texts


@dataclass(slots=True)
class BonResult:
    """The outcome of a Best-of-N request: every candidate, ranked best first."""

    id: str
    model: str
    reward_model: str
    ranked: list[ScoredCandidate]
    usage: Usage
    timings: Timings
    dropped: list[Dropped] = field(default_factory=list)  # one per dropped candidate
    selected_answer: str | None = None
    vote_share: float | None = None
    rejected: list[RejectedCandidate] = field(default_factory=list)  # speculative rejection
    checkpoints: list[CheckpointReport] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RawInput:
    """A candidate given as the reward model's input itself, with no messages (the vLLM and
    OpenRLHF compatibility routes): text already formatted (a chat template applied), or
    token ids (used when non-empty)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Score given answers for a prompt (no generation); or raw inputs, without messages."""

    messages: tuple[Message, ...]
    candidates: tuple[str, ...] = ()
    raw: tuple[RawInput, ...] = ()
    truncate_prompt_tokens: int = 0  # > 0: raw inputs cut to their last this many tokens
    steps: tuple[tuple[str, ...], ...] = ()  # explicit steps, one tuple per answer
    reward_model: str | None = None
    activation: Activation | None = None
    aggregation: Aggregation = "last"
    selection: Selection = "argmax"
    request_id: str = ""


@dataclass(slots=True)
class CandidateScore:
    reward: float
    step_rewards: tuple[float, ...] = ()
    tokens: int = 0
    # The head's raw logits at each position read, row-major, `labels` per row.
    logits: tuple[float, ...] = ()
    labels: int = 0


@dataclass(slots=True)
class ScoreBatchResult:
    """What the worker pool returns for one group (in input order)."""

    model: str
    scores: list[CandidateScore]
    prompt_tokens: int = 0
    total_tokens: int = 0


@dataclass(slots=True)
class ScoreResult:
    model: str
    scores: list[ScoredCandidate]  # input order
    prompt_tokens: int = 0
    total_tokens: int = 0
    selected_index: int = 0
    selected_answer: str | None = None
    vote_share: float | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    kind: Literal["generator", "reward"]
    architecture: str = ""
