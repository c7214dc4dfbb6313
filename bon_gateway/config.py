"""Configuration: one TOML file (stdlib tomllib) validated with pydantic.

Errors name the offending key. Secrets never live here: they come from the
environment.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bon_gateway.errors import BonError


class ConfigError(BonError):
    code = "config_error"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthConfig(_Strict):
    """API keys and per-key rate limits ([server.auth]). The keys themselves never live here."""

    # Comma-separated keys in this environment variable...
    api_keys_env: str = "BON_API_KEYS"
    # ...and/or one key per line in this file (blank lines and `#` comments skipped).
    api_keys_file: str | None = None
    # Token bucket per key: sustained requests per second (0 = no limit) and burst.
    rate_limit_per_s: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)  # 0: max(1, rate_limit_per_s)
    # Prometheus needs a key for /metrics unless this is false; /health is always open.
    metrics_require_key: bool = True
    # /ready needs a key unless this is false (an httpGet probe cannot send one).
    ready_requires_key: bool = True


class TlsConfig(_Strict):
    """HTTPS and gRPC TLS ([server.tls]); both fronts use the same PEM pair."""

    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: give both cert_file and key_file, or neither")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class LimitsConfig(_Strict):
    """Input and load bounds ([server.limits]); beyond them: 400/413, or 429 when overloaded."""

    max_body_bytes: int = Field(default=4 << 20, ge=1024)  # HTTP 413; gRPC RESOURCE_EXHAUSTED
    max_messages: int = Field(default=256, ge=1)
    max_prompt_chars: int = Field(default=1_000_000, ge=1)  # all messages (or the prompt) together
    max_tokens: int = Field(default=32768, ge=1)  # cap on a request's max_tokens
    max_candidates: int = Field(default=256, ge=1)  # /v1/rewards and Score: answers per request
    max_in_flight: int = Field(default=256, ge=1)  # requests being served, both fronts together
    max_queued_groups: int = Field(default=512, ge=1)  # scoring groups outstanding per reward model
    retry_after_s: float = Field(default=1.0, gt=0)  # what a shed request is told
    # HTTP transport, against clients that open connections and send slowly or nothing:
    # the request line and headers together (431 beyond, before authentication) ...
    max_header_bytes: int = Field(default=64 << 10, ge=1024)
    # ... complete within this from the accept or a request's first byte (closed beyond) ...
    header_timeout_s: float = Field(default=10.0, gt=0)
    # ... and the whole body within this after them (408 beyond); the in-flight slot
    # is taken only once the body is in.
    body_timeout_s: float = Field(default=30.0, gt=0)
    # Open HTTP connections; over it the oldest one without a complete request is closed.
    max_connections: int = Field(default=1000, ge=1)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    max_best_of: int = Field(64, ge=1)
    default_best_of: int = Field(4, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    log_level: str = "INFO"
    # text: "TIME LEVEL LOGGER MESSAGE"; json: one object per line (ts, level, logger,
    # message and the key=value fields of the phase lines).
    log_format: Literal["text", "json"] = "text"
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    limits: LimitsConfig = LimitsConfig()
    # Idle HTTP keep-alive connections are closed after this. Longer than the
    # clients' own pool expiry (httpx: 5 s, load balancers: 60 s), so the client
    # closes first: a server closing at the same moment as a request arrives on
    # the connection resets it (seen in bench/soak.py with uvicorn's 5 s default).
    http_keep_alive_s: int = Field(default=75, ge=1)
    # SIGTERM: stop accepting, then give in-flight requests this long to finish.
    # Keep it below the pod's terminationGracePeriodSeconds.
    shutdown_grace_s: float = Field(default=30.0, ge=0)


class GeneratorConfig(_Strict):
    url: str = "http://127.0.0.1:8000/v1"
    # Replicas of the same model: when set, `url` is ignored and calls are balanced
    # over these (least outstanding requests, ejection after repeated failures).
    urls: tuple[str, ...] = ()
    model: str = "default"
    timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(256, ge=1)
    # One upstream reply (or stream) bigger than this is cut and its candidate dropped
    # ("too_large"): a runaway or hostile upstream cannot fill the gateway's memory.
    max_response_bytes: int = Field(8 << 20, ge=1024)
    # parallel: N calls with n=1 and distinct seeds (works everywhere);
    # n: one call with n=N, topped up with parallel calls when fewer choices come back;
    # auto: probe each upstream once with n=N and remember whether it honours n.
    mode: Literal["parallel", "n", "auto"] = "parallel"
    # Retries per call on connect errors, timeouts, 429 and 5xx, within the request deadline.
    retries: int = Field(2, ge=0)
    backoff_base_s: float = Field(0.05, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    # An upstream failing this many calls in a row is skipped for eject_cooldown_s.
    eject_after_failures: int = Field(3, ge=1)
    eject_cooldown_s: float = Field(10.0, ge=0)

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every upstream base URL (`urls`, or the single `url`)."""
        return self.urls or (self.url,)


class JudgeConfig(_Strict):
    """A causal LM used as a reward model: logit(yes) - logit(no)."""

    template: str = (
        "Here is a question and an answer.\n\nQuestion:\n{question}\n\nAnswer:\n{answer}\n\n"
        "Is the answer helpful and correct? Reply with Yes or No."
    )
    yes: str = "Yes"
    no: str = "No"


class StepConfig(_Strict):
    """Process reward models: how answers are split into steps."""

    delimiter: str = "\n\n"
    # math-shepherd style causal-LM PRMs
    step_tag: str = " ки"
    good_token: str = "+"
    bad_token: str = "-"


class ProbeConfig(_Strict):
    """How the pool checks that each worker still answers (a bounded Info call).

    A worker that misses one probe is marked down: new groups go elsewhere and its
    in-flight calls are retried on another worker. One that answers again is up
    again; a spawned one still silent `restart_after_s` after it was marked down
    is killed (SIGKILL) and restarted.
    """

    interval_s: float = Field(2.0, ge=0)  # between probes of one worker; 0: no probing
    timeout_s: float = Field(3.0, gt=0)  # a probe not answered in this long is missed
    restart_after_s: float = Field(30.0, ge=0)  # 0: never kill a hung worker


class RewardModelConfig(_Strict):
    name: str
    path: str  # local directory or hub id (e.g. Skywork/Skywork-Reward-V2-Qwen3-0.6B)
    # auto: picked from config.json "architectures"; judge: causal LM as judge;
    # causal_prm: math-shepherd style PRM on a causal LM.
    kind: Literal["auto", "judge", "causal_prm"] = "auto"
    gguf_file: str | None = None
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    # device = "cuda": GPUs each worker spans. 1: one worker per GPU; more: a model too
    # big for one GPU, its layers spread over that many (transformers device_map).
    gpus_per_worker: int = Field(1, ge=1)
    # Co-located worker processes the gateway spawns (one per GPU). With `addresses`
    # the default is 0 (remote only); `workers = N` plus `addresses` spawns N and
    # shares the load with the remote ones. 0 needs `addresses`.
    workers: int = Field(1, ge=0)
    # Remote workers (bon-gateway worker --listen HOST:PORT).
    addresses: tuple[str, ...] = ()
    # Who runs the model: this gateway's own workers (default), vLLM pooling servers
    # (`vllm serve PATH --runner pooling`) or SGLang reward servers
    # (`python -m sglang.launch_server --model-path PATH --is-embedding`, outcome RMs only)
    # at `backend_urls`, balanced and health-checked. With vllm/sglang the workers load
    # only the tokenizer and config: they build each sequence exactly as for their own
    # forward (template, separators, pooled position) and send its token ids, one
    # request per group (the server's prefix cache sees the prompt).
    backend: Literal["workers", "vllm", "sglang"] = "workers"
    backend_urls: tuple[str, ...] = ()
    backend_model: str | None = None  # the server's model name; None: the one it serves
    max_batch_tokens: int = Field(16384, ge=1)
    max_wait_ms: float = Field(2.0, ge=0)
    # Bytes of prompt keys/values each worker keeps for this model (by token prefix, LRU;
    # open groups' prompts pinned), so requests sharing a prompt compute it once. 0: off.
    prefix_cache_bytes: int = Field(256 << 20, ge=0)
    max_length: int | None = Field(None, ge=1)
    truncate_prompt: bool = False
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    normalize_mean: float = 0.0
    normalize_std: float = Field(1.0, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    judge: JudgeConfig = JudgeConfig()
    steps: StepConfig = StepConfig()
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _workers_or_addresses(self) -> RewardModelConfig:
        if self.addresses and "workers" not in self.model_fields_set:
            object.__setattr__(self, "workers", 0)  # remote only, unless workers is given
        if self.workers == 0 and not self.addresses:
            raise ValueError(f"reward model {self.name!r}: workers = 0 needs remote `addresses`")
        if self.backend != "workers" and not self.backend_urls:
            raise ValueError(f"reward model {self.name!r}: backend = {self.backend!r} needs `backend_urls`")
        if self.backend == "workers" and self.backend_urls:
            raise ValueError(
                f'reward model {self.name!r}: `backend_urls` needs backend = "vllm" or "sglang" '
                '(got "workers")'
            )
        if self.gpus_per_worker > 1 and self.device != "cuda":
            raise ValueError(
                f'reward model {self.name!r}: gpus_per_worker > 1 needs device = "cuda" '
                f"(the worker's GPUs are picked by the pool), got {self.device!r}"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty without spaces")
        return value


def check_schedule(checkpoints: Sequence[int]) -> str | None:
    """What is wrong with a checkpoint schedule (strictly increasing positive token counts), or None."""
    if not checkpoints:
        return "must list at least one token count"
    if any(c < 1 for c in checkpoints):
        return "token counts must be >= 1"
    if any(b <= a for a, b in itertools.pairwise(checkpoints)):
        return "token counts must be strictly increasing"
    return None


class StrategyConfig(_Strict):
    """Search defaults ([strategy]); requests override them per call."""

    # best_of_n: every candidate generated in full, then ranked. speculative_rejection:
    # partial candidates are scored at the checkpoints and the weakest cancelled.
    default: Literal["best_of_n", "speculative_rejection"] = "best_of_n"
    rejection_rate: float = Field(0.5, gt=0, lt=1)
    # Token counts where partial candidates are scored: early enough to save most of a
    # long answer's tokens, late enough for a verifier to tell answers apart.
    checkpoints: tuple[int, ...] = (64, 128, 256)
    # How a checkpoint decides. per_candidate: each candidate is judged the moment it
    # reaches the checkpoint, against the rewards seen there so far, so fast candidates
    # are stopped without waiting for the slowest. round: the checkpoint waits until
    # every live candidate reached it, then rejects the lowest share of all of them.
    rejection: Literal["per_candidate", "round"] = "per_candidate"
    # per_candidate: how many candidates must have reached a checkpoint before anyone is
    # rejected there (the first ones are then judged together). None: ceil((1 -
    # rejection_rate) * best_of), at least 2 (see README, "Search").
    min_peers: int | None = Field(None, ge=1)
    # best_of_n: each live candidate's text goes to its reward worker every this many new
    # tokens while it is generated (the worker keeps its keys and values), so that scoring
    # a finished candidate computes only its last tokens. 0: score whole texts at the end.
    prefill_every: int = Field(32, ge=0)

    @field_validator("checkpoints")
    @classmethod
    def _schedule(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        problem = check_schedule(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    generator: GeneratorConfig = GeneratorConfig()
    strategy: StrategyConfig = StrategyConfig()
    reward_models: tuple[RewardModelConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        names = [m.name for m in self.reward_models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward_models: duplicate name(s) {dupes}")
        if self.server.default_best_of > self.server.max_best_of:
            raise ValueError("server.default_best_of must be <= server.max_best_of")
        return self

    def reward_model(self, name: str) -> RewardModelConfig:
        for entry in self.reward_models:
            if entry.name == name:
                return entry
        raise KeyError(name)


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{key}: {item['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def parse_config(data: dict[str, object]) -> GatewayConfig:
    """Validate a config mapping; ConfigError names the offending key."""
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: Path | None) -> GatewayConfig:
    """Load and validate a TOML config file (None: all defaults)."""
    if path is None:
        return GatewayConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    return parse_config(data)


def with_overrides(config: GatewayConfig, overrides: Mapping[str, object | None]) -> GatewayConfig:
    """`config` with command-line values laid over it, validated once (errors name the key).

    Keys are dotted paths into the config (`server.http_port`, `generator.urls`);
    `reward_models.*.KEY` sets KEY on every reward model entry. None values (a
    flag not given) leave the file's value.
    """
    data: dict[str, Any] = config.model_dump(exclude_unset=True)
    for path, value in overrides.items():
        if value is None:
            continue
        section, _, rest = path.partition(".")
        if section == "reward_models" and rest.startswith("*."):
            for entry in data.setdefault("reward_models", []):
                entry[rest[2:]] = value
        elif rest:
            data.setdefault(section, {})[rest] = value
        else:
            data[section] = value
    return parse_config(data)


def parse_reward_model_flag(flag: str) -> tuple[str, str]:
    """`NAME=PATH_OR_HF_ID` from --reward-model."""
    name, sep, path = flag.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--reward-model expects NAME=PATH_OR_HF_ID, got {flag!r}")
    return name, path
