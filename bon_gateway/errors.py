"""The one exception tree. Each front maps it to its status codes in one place
(api/http_errors.py for HTTP, api/grpc_service.py for gRPC)."""

from __future__ import annotations


class BonError(Exception):
    """Base of every error the gateway reports to a client."""

    #: stable machine-readable code, used as OpenAI error "type"/"code"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the offending request field, when there is one


class InvalidRequest(BonError):
    """Bad input: 400 / INVALID_ARGUMENT. `param` names the field."""

    code = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    """A model the request names is not served: 404 on the vLLM-compatible routes (as vLLM
    answers), INVALID_ARGUMENT over gRPC."""

    code = "model_not_found"


class RequestTooLarge(InvalidRequest):
    """A body or message over a configured size: 413 / INVALID_ARGUMENT."""

    code = "request_too_large"


class Unauthenticated(BonError):
    code = "unauthenticated"


class Overloaded(BonError):
    """Shed load: 429 / RESOURCE_EXHAUSTED."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(BonError):
    """Upstream or workers down: 503 / UNAVAILABLE."""

    code = "unavailable"


class UpstreamError(Unavailable):
    """The generator failed (after retries)."""

    code = "upstream_error"


class WorkerError(Unavailable):
    """The reward-model workers failed."""

    code = "worker_error"


class DeadlineExceeded(BonError):
    code = "deadline_exceeded"
