"""What the client raises: the server's errors, one class per status it documents, and the lack of
an answer. The names follow the `openai` package's, so code that catches one reads the same."""

from __future__ import annotations

from server.protocol import ErrorInfo


class GenerativeAdapterError(Exception):
    """Base of every error the client raises."""


class ConnectionFailed(GenerativeAdapterError):
    """No whole answer: the server could not be reached (after the retries), a request timed out,
    or a stream broke before its end."""


class ApiError(GenerativeAdapterError):
    """The server answered with an error: its HTTP `status` and OpenAI's `error` body (`type`,
    `message`, `param`, `code`); `retry_after_s` when it said when to try again (a 429)."""

    def __init__(self, status: int, error: ErrorInfo, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {error.type}: {error.message}")
        self.status = status
        self.error = error
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return self.error.type

    @property
    def message(self) -> str:
        return self.error.message


class BadRequestError(ApiError):
    """400: e.g. a prompt plus max_tokens longer than the model's context, or vLLM refused it."""


class AuthenticationError(ApiError):
    """401: the server has API keys and the request had no valid one."""


class NotFoundError(ApiError):
    """404: no such adapter or model (or another tenant's)."""


class ConflictError(ApiError):
    """409: an adapter made for another base model, rank or generator."""


class PayloadTooLargeError(ApiError):
    """413: a context over the server's token limit, or a body over its size limit."""


class UnprocessableEntityError(ApiError):
    """422: invalid input (an empty context, a malformed adapter id, wrong types)."""


class RateLimitError(ApiError):
    """429: a tenant's limit; `retry_after_s` says when to try again."""


class InternalServerError(ApiError):
    """500: the server failed on this request (its log says why)."""


class ServiceUnavailableError(ApiError):
    """503: the adapter store or the engine is down; the server recovers when it is back."""


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
}


def api_error(status: int, error: ErrorInfo, retry_after_s: float | None = None) -> ApiError:
    """The error class of `status` (ApiError itself for a status the server does not document)."""
    return BY_STATUS.get(status, ApiError)(status, error, retry_after_s)
