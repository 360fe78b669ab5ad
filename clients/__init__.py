"""Python client of the Generative Adapter server: blocking and asyncio, typed, no torch."""

from clients.client import AsyncGenerativeAdapterClient, GenerativeAdapterClient
from clients.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionFailed,
    GenerativeAdapterError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from clients.wire import ChatCompletionChunk, Retry

__all__ = [
    "ApiError",
    "AsyncGenerativeAdapterClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletionChunk",
    "ConflictError",
    "ConnectionFailed",
    "GenerativeAdapterClient",
    "GenerativeAdapterError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "Retry",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
]
