"""Admission: the one place a request is checked before any work is done for it.

Both fronts convert their wire format into a `BonRequest` / `ScoreRequest` and
hand it to `Admission`; whatever is wrong with it (sizes over `server.limits`,
values out of range, unknown roles, an unknown reward model) is an
InvalidRequest naming the field, before an upstream call or a worker sees it.
Field names are the HTTP API's (`temperature`, `max_tokens`, `model` for the
scoring model); the gRPC front renames the few that differ in its own module.

Text and passthrough values are checked here too, for both fronts: a lone
UTF-16 surrogate (which Python's json accepts from "\\ud800" but no worker or
upstream can encode), NaN / Infinity (not JSON: never sent upstream) and values
nested deeper than MAX_NESTING are refused naming the field.

Pure: no I/O, no clock. The engine owns one `Admission` and exposes it as
`engine.admit(...)` / `engine.admit_score(...)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from bon_gateway.config import LimitsConfig, ServerConfig, StrategyConfig, check_schedule
from bon_gateway.engine.search import SearchPlan
from bon_gateway.errors import InvalidRequest, Unavailable
from bon_gateway.types import STRATEGIES, BonRequest, Message, SamplingParams, ScoreRequest, scoring_text

__all__ = ["MAX_NESTING", "ROLES", "Admission", "AdmittedBon", "AdmittedScore"]

ROLES = ("system", "user", "assistant", "developer", "tool")

# Passthrough values (tools' JSON schemas, response_format) nest a few levels; far
# deeper is an attack on every parser on the way (ours, the upstream's).
MAX_NESTING = 32


@dataclass(frozen=True, slots=True)
class AdmittedBon:
    """A Best-of-N request that passed admission: what `Engine.run` takes."""

    request: BonRequest
    reward_model: str
    # What the reward model scores the candidates against: the chat, or the
    # plain prompt as one user turn.
    scoring_messages: tuple[Message, ...]
    # The search: no checkpoints for best_of_n; the request's or the configured
    # checkpoints and rejection rate for speculative_rejection.
    plan: SearchPlan


@dataclass(frozen=True, slots=True)
class AdmittedScore:
    """A scoring request that passed admission: what `Engine.score` takes."""

    request: ScoreRequest
    reward_model: str
    texts: tuple[str, ...]  # one per answer (explicit steps joined)


class Admission:
    """Checks requests against the server's bounds and the served reward models."""

    def __init__(
        self,
        server: ServerConfig,
        reward_models: Callable[[], Sequence[str]],
        strategy: StrategyConfig | None = None,
    ) -> None:
        self.server = server
        self.strategy = strategy or StrategyConfig()
        self._reward_models = reward_models

    def reward_model(self, name: str | None, *, param: str = "reward_model") -> str:
        """The reward model a request uses; unknown names are a 400, none configured a 503."""
        names = list(self._reward_models())
        if name:
            if name not in names:
                raise InvalidRequest(
                    f"unknown {param} {name!r}; available: {', '.join(names) or 'none'}", param=param
                )
            return name
        if not names:
            raise Unavailable("no reward model is configured")
        return names[0]

    def admit_bon(self, request: BonRequest) -> AdmittedBon:
        max_best_of = self.server.max_best_of
        if not 1 <= request.best_of <= max_best_of:
            raise InvalidRequest(f"best_of must be between 1 and {max_best_of}", param="best_of")
        if not 1 <= request.n <= request.best_of:
            raise InvalidRequest("n must be between 1 and best_of", param="n")
        if request.min_candidates is not None and not 1 <= request.min_candidates <= request.best_of:
            raise InvalidRequest("min_candidates must be between 1 and best_of", param="min_candidates")
        limits = self.server.limits
        if request.prompt is None:
            _check_messages(request.messages)
        else:
            _check_text(request.prompt, "prompt")
        for param, name in (("model", request.model), ("reward_model", request.reward_model)):
            if name is not None:
                _check_text(name, param)
        _check_sizes(request.messages, request.prompt, limits)
        _check_sampling(request.sampling, limits)
        plan = self._plan(request)
        reward_model = self.reward_model(request.reward_model)
        if request.prompt is not None:
            scoring: tuple[Message, ...] = (Message("user", request.prompt),)
        else:
            scoring = _scoring_messages(request.messages)
        return AdmittedBon(request, reward_model, scoring, plan)

    def _plan(self, request: BonRequest) -> SearchPlan:
        strategy = request.strategy or self.strategy.default
        if strategy not in STRATEGIES:
            raise InvalidRequest(f"strategy must be one of {', '.join(STRATEGIES)}", param="strategy")
        if strategy == "best_of_n":
            for name, value in (
                ("rejection_rate", request.rejection_rate),
                ("checkpoints", request.checkpoints),
            ):
                if value:
                    raise InvalidRequest(
                        f"{name} applies to strategy speculative_rejection, not best_of_n", param=name
                    )
            return SearchPlan(
                keep=request.n, aggregation=request.aggregation, prefill_every=self.strategy.prefill_every
            )
        rate = self.strategy.rejection_rate if request.rejection_rate is None else request.rejection_rate
        if not 0 < rate < 1:
            raise InvalidRequest("rejection_rate must be in (0, 1)", param="rejection_rate")
        checkpoints = request.checkpoints or self.strategy.checkpoints
        problem = check_schedule(checkpoints)
        if problem is not None or len(checkpoints) > 32:
            raise InvalidRequest(
                f"checkpoints {problem or 'lists at most 32 token counts'}", param="checkpoints"
            )
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None:
            # Checkpoints past the answer's length never come: drop them.
            checkpoints = tuple(c for c in checkpoints if c < max_tokens)
        per_candidate = self.strategy.rejection == "per_candidate"
        min_peers = self.strategy.min_peers
        if min_peers is None:
            min_peers = max(2, math.ceil((1 - rate) * request.best_of - 1e-9))
        return SearchPlan(
            checkpoints,
            rate,
            keep=request.n,
            aggregation=request.aggregation,
            per_candidate=per_candidate,
            min_peers=min_peers,
        )

    def admit_score(self, request: ScoreRequest) -> AdmittedScore:
        if request.raw:
            return self._admit_raw(request)
        _check_messages(request.messages)
        if not request.candidates and not request.steps:
            raise InvalidRequest("candidates must be a non-empty list", param="candidates")
        if request.candidates and request.steps:
            raise InvalidRequest("give either candidates or steps, not both", param="steps")
        limits = self.server.limits
        if request.reward_model is not None:
            _check_text(request.reward_model, "model")
        _check_sizes(request.messages, None, limits)
        for i, candidate in enumerate(request.candidates):
            _check_text(candidate, f"candidates[{i}]")
        for i, steps in enumerate(request.steps):
            for j, step in enumerate(steps):
                _check_text(step, f"steps[{i}][{j}]")
        count = max(len(request.candidates), len(request.steps))
        if count > limits.max_candidates:
            raise InvalidRequest(
                f"candidates: {count} answers, at most {limits.max_candidates} allowed "
                "(server.limits.max_candidates)",
                param="candidates",
            )
        texts = request.candidates or tuple("".join(steps) for steps in request.steps)
        answer_chars = sum(len(t) for t in texts)
        if answer_chars > limits.max_prompt_chars * 4:
            # Answers are scored with the prompt, so they share its budget (several answers' worth).
            raise InvalidRequest(
                f"candidates: {answer_chars} characters in all, at most {limits.max_prompt_chars * 4} "
                "allowed (4 x server.limits.max_prompt_chars)",
                param="candidates",
            )
        reward_model = self.reward_model(request.reward_model, param="model")
        # Only the reward model reads these messages: tool calls rendered into their turns.
        request = replace(request, messages=_scoring_messages(request.messages))
        return AdmittedScore(request, reward_model, texts)

    def _admit_raw(self, request: ScoreRequest) -> AdmittedScore:
        """Raw inputs (the compatibility routes' `input` / `query`): the model's input itself,
        so no messages; each one within a prompt's and its answers' budget (5 x
        server.limits.max_prompt_chars characters, or that many token ids)."""
        limits = self.server.limits
        if request.messages or request.candidates or request.steps:
            raise InvalidRequest("give either input or messages, not both", param="input")
        if request.reward_model is not None:
            _check_text(request.reward_model, "model")
        if len(request.raw) > limits.max_candidates:
            raise InvalidRequest(
                f"input: {len(request.raw)} inputs, at most {limits.max_candidates} allowed "
                "(server.limits.max_candidates)",
                param="input",
            )
        bound = limits.max_prompt_chars * 5
        for i, raw in enumerate(request.raw):
            param = f"input[{i}]"
            size = len(raw.token_ids) or len(raw.text)
            if size == 0:
                raise InvalidRequest(f"{param} is empty: there is nothing to score", param=param)
            if size > bound:
                unit = "token ids" if raw.token_ids else "characters"
                raise InvalidRequest(
                    f"{param}: {size} {unit}, at most {bound} allowed (5 x server.limits.max_prompt_chars)",
                    param=param,
                )
            if raw.token_ids:
                if any(not 0 <= t < 2**31 for t in raw.token_ids):
                    raise InvalidRequest(f"{param}: token ids are between 0 and 2**31 - 1", param=param)
            else:
                _check_text(raw.text, param)
        # The worker's wire field is an int32: a bigger count is the client's 400, not a
        # ValueError (500) when the worker request is built (found by bench/fuzz_at_scale.py).
        if not 0 <= request.truncate_prompt_tokens < 2**31:
            raise InvalidRequest(
                "truncate_prompt_tokens must be between 0 and 2**31 - 1 (or -1: no cut)",
                param="truncate_prompt_tokens",
            )
        reward_model = self.reward_model(request.reward_model, param="model")
        return AdmittedScore(request, reward_model, tuple(r.text for r in request.raw))


def _scoring_messages(messages: Sequence[Message]) -> tuple[Message, ...]:
    """The chat as the reward model reads it: each turn as text, an assistant turn's tool
    calls rendered after its content (types.scoring_text)."""
    return tuple(
        Message(m.role, scoring_text(m.content, m.tool_calls)) if m.tool_calls else m for m in messages
    )


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not message.role:
            raise InvalidRequest(f"messages[{i}].role is required", param=f"messages[{i}].role")
        if message.role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be {', '.join(ROLES[:-1])} or {ROLES[-1]}",
                param=f"messages[{i}].role",
            )
        _check_text(message.content, f"messages[{i}].content")
        for param, value in (("name", message.name), ("tool_call_id", message.tool_call_id)):
            if value is not None:
                _check_text(value, f"messages[{i}].{param}")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(
                f"messages[{i}].tool_calls: only an assistant turn calls tools",
                param=f"messages[{i}].tool_calls",
            )
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not call.name:
                raise InvalidRequest(f"{where}.function.name is required", param=f"{where}.function.name")
            _check_text(call.id, f"{where}.id")
            _check_text(call.name, f"{where}.function.name")
            _check_text(call.arguments, f"{where}.function.arguments")


def _check_text(value: str, param: str) -> None:
    """A lone surrogate (JSON's "\\ud800" decodes to one) is not Unicode text: nothing
    downstream can encode it (protobuf to the workers, UTF-8 to the upstream)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"{param}: a lone UTF-16 surrogate at character {err.start} is not valid Unicode text",
            param=param,
        ) from None


def _check_value(value: object, param: str, depth: int = 0) -> None:
    """A passthrough value is plain JSON: finite numbers, Unicode text, bounded nesting."""
    if depth > MAX_NESTING:
        raise InvalidRequest(f"{param}: nested deeper than {MAX_NESTING} levels", param=param)
    if isinstance(value, str):
        _check_text(value, param)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(
                f"{param}: {value} is not a JSON number (NaN and Infinity are not)", param=param
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(str(key), param)
            named = (
                f"{param}.{key}" if isinstance(key, str) and key.isidentifier() and len(key) <= 64 else param
            )
            _check_value(item, named, depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{param}[{i}]", depth + 1)


def _check_sizes(messages: Sequence[Message], prompt: str | None, limits: LimitsConfig) -> None:
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages: {len(messages)} messages, at most {limits.max_messages} allowed "
            "(server.limits.max_messages)",
            param="messages",
        )
    chars = sum(
        len(m.content) + len(m.role) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
        for m in messages
    ) + len(prompt or "")
    if chars > limits.max_prompt_chars:
        param = "prompt" if prompt is not None else "messages"
        raise InvalidRequest(
            f"{param}: {chars} characters, at most {limits.max_prompt_chars} allowed "
            "(server.limits.max_prompt_chars)",
            param=param,
        )


def _check_sampling(sampling: SamplingParams, limits: LimitsConfig) -> None:
    # Out-of-range values would fail every upstream call and come back as a 503:
    # they are the client's mistake, so a 400 before any call.
    if sampling.temperature is not None and not sampling.temperature >= 0:
        raise InvalidRequest("temperature must be >= 0", param="temperature")
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    max_tokens = sampling.max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1", param="max_tokens")
        if max_tokens > limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens: {max_tokens} is over the limit of {limits.max_tokens} "
                "(server.limits.max_tokens)",
                param="max_tokens",
            )
    if sum(len(s) for s in sampling.stop) > limits.max_prompt_chars:
        raise InvalidRequest("stop: too long (server.limits.max_prompt_chars)", param="stop")
    for i, stop in enumerate(sampling.stop):
        _check_text(stop, f"stop[{i}]")
    for name, value in sampling.extra.items():
        _check_value(value, name)
        # Passed to the upstream with the prompt (tools are read as part of it): the same budget.
        chars = len(json.dumps(value, ensure_ascii=False))
        if chars > limits.max_prompt_chars:
            raise InvalidRequest(
                f"{name}: {chars} characters of JSON, at most {limits.max_prompt_chars} allowed "
                "(server.limits.max_prompt_chars)",
                param=name,
            )
