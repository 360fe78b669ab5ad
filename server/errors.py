"""Typed errors of the server, mapped once to HTTP responses in OpenAI's error shape."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class ServerError(Exception):
    """Base of the errors a client can act on; `status` and `type` shape the HTTP answer."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServerError):
    status, type = 400, "invalid_request_error"


class UnprocessableInput(ServerError):
    status, type = 422, "invalid_request_error"


class InvalidAdapterId(UnprocessableInput):
    """Raised before an id ever becomes part of a path."""


class EmptyContext(UnprocessableInput):
    pass


class AdapterNotFound(ServerError):
    status, type = 404, "not_found_error"


class ModelNotFound(AdapterNotFound):
    pass


class ContextTooLong(ServerError):
    status, type = 413, "invalid_request_error"


class AdapterMismatch(ServerError):
    """A stored adapter was made for another base model, rank or generator."""

    status, type = 409, "conflict_error"


class TooManyRequests(ServerError):
    """A tenant's limit is reached; `retry_after_s` says when to try again (Retry-After)."""

    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RoleNotServed(ServerError):
    """This server's role runs without what the request needs: it never will serve it (not a
    404, which says an adapter is missing, nor a 503, which clients retry)."""

    status, type = 501, "not_implemented_error"


class StoreUnavailable(ServerError):
    status, type = 503, "service_unavailable"


class EngineUnavailable(ServerError):
    status, type = 503, "service_unavailable"


def error_body(status: int, message: str, type_: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=status))


def internal_error() -> ErrorResponse:
    """What a client learns of a failure of ours: that it happened (the log has the rest)."""
    return error_body(500, "internal error: the server failed on this request", "internal_error")


def error_response(exc: ServerError) -> ErrorResponse:
    return error_body(exc.status, exc.message, exc.type, exc.param)


def _json(status: int, body: ErrorResponse) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status)


def http_response(exc: ServerError) -> JSONResponse:
    """A typed error as HTTP: from the handler below, or from a middleware that answers before
    the app's handlers are reached."""
    response = _json(exc.status, error_response(exc))
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
    return response


def install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses."""

    @app.exception_handler(ServerError)
    async def server_error(_: Request, exc: ServerError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return http_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            problems.append(f"{where or 'body'}: {e['msg']}")
        param = ".".join(str(p) for p in exc.errors()[0]["loc"][1:]) if exc.errors() else ""
        message = "; ".join(problems)
        return _json(422, error_body(422, message, "invalid_request_error", param or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, error_body(exc.status_code, str(exc.detail), "http_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _json(500, internal_error())
