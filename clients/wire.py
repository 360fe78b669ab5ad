"""The client's side of the wire format, written once for the blocking and the asyncio client:
each call's request and how its answer is read, server-sent events, errors, and when to retry.
The two clients (client.py) only send, wait and read bytes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from clients.errors import ApiError, ConnectionFailed, api_error
from server.protocol import (
    AdapterInfo,
    AdaptRequest,
    AdaptResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeleteResponse,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    OpenAIModel,
    UsageInfo,
)

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"  # `genadapter serve`'s default address
URL_ENV = "GENADAPTER_URL"
API_KEY_ENV = "GENADAPTER_API_KEY"
TIMEOUT_S = 600.0  # adapting a long context on a CPU can take minutes
CONNECT_TIMEOUT_S = 10.0
DONE = "[DONE]"  # the last event of a stream, as OpenAI's

Message = ChatMessage | Mapping[str, str]  # {"role": "user", "content": "..."}


def http_options(base_url: str | None, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    """httpx.Client's or httpx.AsyncClient's arguments; the URL and key default to
    $GENADAPTER_URL and $GENADAPTER_API_KEY."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {
        "base_url": base_url or os.environ.get(URL_ENV) or DEFAULT_URL,
        "headers": {"Authorization": f"Bearer {key}"} if key else {},
        "timeout": httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
    }


@dataclass(frozen=True)
class Retry:
    """How often a request that surely did not run is sent again: after a connection that failed,
    or a 503 (Redis or the engine down for a moment; the server recovers). Never after a 4xx (the
    request is wrong) or another 5xx (it may have run), nor after a stream has begun."""

    attempts: int = 4
    backoff_s: float = 0.5  # the wait before the second attempt, doubled before each next one
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry needs at least one attempt")

    def waits(self) -> Iterator[float]:
        """Seconds to wait before each attempt: none before the first."""
        yield 0.0
        for n in range(self.attempts - 1):
            yield min(self.backoff_s * 2**n, self.max_backoff_s)


Outcome = httpx.Response | httpx.TransportError  # what one attempt got


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, and how its JSON answer becomes T."""

    stream: ClassVar[bool] = False
    method: str
    path: str
    parse: Callable[[Any], T]
    body: BaseModel | None = None
    answers: tuple[int, ...] = ()  # error statuses that are an answer here (health's 503)

    def json(self) -> Any:
        """What the caller set, nothing else: the server's defaults apply to the rest."""
        if self.body is None:
            return None
        return self.body.model_dump(mode="json", exclude_unset=True, exclude_none=True)

    def retried(self, outcome: Outcome) -> bool:
        if isinstance(outcome, httpx.Response):
            return outcome.status_code == 503 and 503 not in self.answers
        return isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout)

    def checked(self, outcome: Outcome, url: httpx.URL) -> httpx.Response:
        """The response to read, or the error to raise (its body already read)."""
        if isinstance(outcome, httpx.TransportError):
            raise self.failed(outcome, url) from outcome
        if outcome.is_error and outcome.status_code not in self.answers:
            raise error_of(outcome)
        return outcome

    def failed(self, e: httpx.TransportError, url: httpx.URL) -> ConnectionFailed:
        return ConnectionFailed(f"{self.method} {url}: {type(e).__name__}: {e}")

    @contextlib.contextmanager
    def reading(self, response: httpx.Response) -> Iterator[None]:
        """While a stream is read: a broken connection or timeout is a ConnectionFailed."""
        try:
            yield
        except httpx.TransportError as e:
            raise self.failed(e, response.url) from e


class StreamCall(Call[T]):
    """A request answered with server-sent events, each parsed as T."""

    stream = True


def error_of(response: httpx.Response) -> ApiError:
    """The typed error of an error response (OpenAI's shape, or any body a proxy sends)."""
    try:
        error = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        text = response.text.strip() or response.reason_phrase
        error = ErrorInfo(message=text, type="http_error", code=response.status_code)
    try:
        retry_after = float(response.headers.get("retry-after", ""))
    except ValueError:
        retry_after = None
    return api_error(response.status_code, error, retry_after)


class Events(Generic[T]):
    """Server-sent events, fed line by line, parsed as T; `done` after `data: [DONE]`. An error
    event (a stream that failed after it began) is raised as the server's ApiError."""

    def __init__(self, call: StreamCall[T]) -> None:
        self.call = call
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> list[T]:
        """The events this line completes (at most one: a blank line ends an event)."""
        if line.startswith("data:"):
            self.data.append(line.removeprefix("data:").removeprefix(" "))
            return []
        if line or not self.data:  # other fields and comments; blank lines between events
            return []
        data, self.data = "\n".join(self.data), []
        if data == DONE:
            self.done = True
            return []
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload:
            error = ErrorResponse.model_validate(payload).error
            raise api_error(error.code if isinstance(error.code, int) else 500, error)
        return [self.call.parse(payload)]

    def finish(self) -> None:
        """The stream ended: without its [DONE], the answer is cut short."""
        if not self.done:
            raise ConnectionFailed(f"{self.call.method} {self.call.path}: the stream ended early")


# --- The calls ----------------------------------------------------------------------------------


class ChunkDelta(OpenAIModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(OpenAIModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    """One event of a streamed chat completion (OpenAI's chat.completion.chunk, as vLLM sends
    it); `text` is the new text of its choices."""

    id: str
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None

    @property
    def text(self) -> str:
        return "".join(c.delta.content or "" for c in self.choices)


def _messages(messages: Sequence[Message]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in messages]


def _adapter_path(adapter_id: str) -> str:
    return f"/v1/adapters/{quote(adapter_id, safe='')}"  # an id never changes the path


def adapt(
    context: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    documents: Sequence[str] | None = None,
    compose: Sequence[str] | None = None,
    parent: str | None = None,
) -> Call[AdaptResponse]:
    """Make (or find: `cached`) the adapter of exactly one of: a text, a chat history, documents
    read in order, or adapters of one generator to compose (their sum, no text read). `parent`
    extends that adapter with the new text."""
    request = AdaptRequest(
        context=context,
        messages=None if messages is None else _messages(messages),
        documents=None if documents is None else list(documents),
        compose=None if compose is None else list(compose),
        parent=parent,
    )
    return Call("POST", "/v1/adapt", AdaptResponse.model_validate, request)


def generate(adapter_id: str | None, prompt: str, **sampling: Any) -> Call[GenerateResponse]:
    """Answer `prompt` (one user turn) with an adapter (None: the base model); sampling options
    as OpenAI's: max_tokens, temperature, top_p, stop, seed, ignore_eos."""
    request = GenerateRequest(adapter_id=adapter_id, prompt=prompt, **sampling)
    return Call("POST", "/v1/generate", GenerateResponse.model_validate, request)


def stream_generate(
    adapter_id: str | None, prompt: str, **sampling: Any
) -> StreamCall[GenerateStreamResponse]:
    """`generate`, streamed: each event's `text` is the new text."""
    request = GenerateRequest(adapter_id=adapter_id, prompt=prompt, stream=True, **sampling)
    return StreamCall("POST", "/v1/generate", GenerateStreamResponse.model_validate, request)


def chat(model: str, messages: Sequence[Message], **sampling: Any) -> Call[ChatCompletionResponse]:
    """OpenAI's chat completion; `model` is an adapter id or the base model's name."""
    request = ChatCompletionRequest(model=model, messages=_messages(messages), **sampling)
    return Call("POST", "/v1/chat/completions", ChatCompletionResponse.model_validate, request)


def stream_chat(
    model: str, messages: Sequence[Message], **sampling: Any
) -> StreamCall[ChatCompletionChunk]:
    """`chat`, streamed: each chunk's `text` is the new text."""
    request = ChatCompletionRequest(
        model=model, messages=_messages(messages), stream=True, **sampling
    )
    return StreamCall("POST", "/v1/chat/completions", ChatCompletionChunk.model_validate, request)


def models() -> Call[ModelList]:
    """The base model, then every adapter this caller may use, each usable as a chat `model`."""
    return Call("GET", "/v1/models", ModelList.model_validate)


def adapters() -> Call[list[ModelCard]]:
    """The adapters this caller may use (the models that have a base model as parent)."""
    return Call(
        "GET",
        "/v1/models",
        lambda body: [m for m in ModelList.model_validate(body).data if m.parent],
    )


def info(adapter_id: str) -> Call[AdapterInfo]:
    """An adapter's metadata: tokens read, base model, rank, parent, composed parts."""
    return Call("GET", _adapter_path(adapter_id), AdapterInfo.model_validate)


def delete(adapter_id: str) -> Call[DeleteResponse]:
    """Delete an adapter; requests naming it later get a 404."""
    return Call("DELETE", _adapter_path(adapter_id), DeleteResponse.model_validate)


def health() -> Call[HealthResponse]:
    """Readiness: a server that is up but not ready answers 503 with the same body, not an error."""
    return Call("GET", "/health", HealthResponse.model_validate, answers=(503,))
