"""The typed client (blocking and asyncio alike) and `genadapter client`, without a real server:
scripted answers (httpx.MockTransport) for the retry policy, errors and events, and the app's real
routes in process (a fake engine) for the wire format. The real server: tests/test_server.py."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from clients import (
    ApiError,
    AsyncGenerativeAdapterClient,
    AuthenticationError,
    ConnectionFailed,
    GenerativeAdapterClient,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    Retry,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from clients.wire import Events, stream_chat
from generator.maker import AdapterMaker
from server.store import MemoryStore
from tests.test_app import CONTEXT, maker, pipeline, start_app  # noqa: F401 (fixtures)

T = TypeVar("T")
Client = GenerativeAdapterClient | AsyncGenerativeAdapterClient
Answer = httpx.Response | Exception
URL = "http://genadapter.test"
AID = "ga-" + "7" * 32
FAST = Retry(attempts=3, backoff_s=0)


def error(status: int, message: str, type_: str = "invalid_request_error") -> httpx.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return httpx.Response(status, json=body)


def events(*payloads: object, done: bool = True) -> httpx.Response:
    lines = [f"data: {json.dumps(p)}\n\n" for p in payloads] + (["data: [DONE]\n\n"] * done)
    return httpx.Response(200, text="".join(lines), headers={"content-type": "text/event-stream"})


def chunk(text: str) -> dict:
    """A chat.completion.chunk as vLLM streams it."""
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    return {"id": "c", "object": "chat.completion.chunk", "model": AID, "choices": [choice]}


GENERATED = {
    "id": "gen-1",
    "adapter_id": AID,
    "text": "Velloran",
    "token_ids": [1, 2],
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
HEALTH = {"ready": False, "engine": "ok", "store": "store unavailable: Redis"}


class Script:
    """A MockTransport handler: the requests it got, answered in turn by `answers` (the last one
    repeated), each a response (sent as a fresh copy) or an exception (raised)."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


@pytest.fixture(params=["blocking", "asyncio"])
def connect(request: pytest.FixtureRequest) -> Callable[..., Client]:
    """Either client on a scripted transport: every test of the logic runs against both."""
    kind = {"blocking": GenerativeAdapterClient, "asyncio": AsyncGenerativeAdapterClient}
    client = kind[request.param]

    def make(script: Script, **options: Any) -> Client:
        return client(URL, transport=httpx.MockTransport(script), **{"retry": FAST, **options})

    return make


async def settle(result: Awaitable[T] | T) -> T:
    """A blocking call's result, or an async call's awaited."""
    return await result if isinstance(result, Awaitable) else result


async def collect(stream: Iterable[T] | AsyncIterator[T]) -> list[T]:
    if isinstance(stream, AsyncIterator):
        return [x async for x in stream]
    return list(stream)


# --- retries ------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    assert list(Retry(attempts=6, backoff_s=1, max_backoff_s=5).waits()) == [0, 1, 2, 4, 5, 5]
    assert list(Retry(attempts=1).waits()) == [0]
    with pytest.raises(ValueError, match="at least one attempt"):
        Retry(attempts=0)


async def test_a_503_is_retried_until_it_passes(connect: Callable[..., Client]) -> None:
    script = Script(
        error(503, "store down"), error(503, "store down"), httpx.Response(200, json=GENERATED)
    )
    answer = await settle(connect(script).generate(AID, "Capital?"))
    assert answer.text == "Velloran" and len(script.requests) == 3
    assert script.bodies() == [{"adapter_id": AID, "prompt": "Capital?"}] * 3


async def test_retries_wait_their_backoff(connect: Callable[..., Client]) -> None:
    script = Script(error(503, "engine down"))
    start = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as e:
        await settle(connect(script, retry=Retry(3, backoff_s=0.05)).info(AID))
    assert time.monotonic() - start >= 0.15  # 0.05 + 0.1
    assert (len(script.requests), e.value.status, e.value.message) == (3, 503, "engine down")


@pytest.mark.parametrize(
    ("failure", "retried"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), True),
        (httpx.ConnectTimeout("timed out"), True),
        (httpx.ReadTimeout("timed out"), False),  # it reached the server: it may have run
        (httpx.RemoteProtocolError("Server disconnected"), False),
    ],
)
async def test_only_connections_that_failed_are_retried(
    connect: Callable[..., Client], failure: Exception, retried: bool
) -> None:
    script = Script(failure)
    with pytest.raises(ConnectionFailed, match=f"POST {URL}/v1/adapt: {type(failure).__name__}"):
        await settle(connect(script).adapt(context=CONTEXT))
    assert len(script.requests) == (FAST.attempts if retried else 1)


async def test_a_connection_back_in_time_is_used(connect: Callable[..., Client]) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json=GENERATED))
    assert (await settle(connect(script).generate(AID, "Capital?"))).text == "Velloran"


@pytest.mark.parametrize(
    ("answer", "kind", "status", "message"),
    [
        (
            error(404, f"adapter {AID} not found", "not_found_error"),
            NotFoundError,
            404,
            "not found",
        ),
        (error(422, "context is empty"), UnprocessableEntityError, 422, "context is empty"),
        (error(401, "a valid API key is required"), AuthenticationError, 401, "API key"),
        (error(500, "internal error", "internal_error"), InternalServerError, 500, "internal"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), ApiError, 502, "<html>Bad Gateway"),
        (httpx.Response(504, text=""), ApiError, 504, "Gateway Timeout"),
    ],
)
async def test_errors_are_typed_and_never_retried(
    connect: Callable[..., Client],
    answer: httpx.Response,
    kind: type[ApiError],
    status: int,
    message: str,
) -> None:
    script = Script(answer)
    with pytest.raises(kind) as e:
        await settle(connect(script).adapt(context=CONTEXT))
    assert type(e.value) is kind and e.value.status == status and message in e.value.message
    assert len(script.requests) == 1


async def test_a_429_says_when_to_try_again(connect: Callable[..., Client]) -> None:
    limited = error(429, "tenant over 4 adapts at once", "rate_limit_error")
    limited.headers["Retry-After"] = "3"
    script = Script(limited)
    with pytest.raises(RateLimitError) as e:
        await settle(connect(script).adapt(context=CONTEXT))
    assert (e.value.retry_after_s, e.value.type, len(script.requests)) == (3, "rate_limit_error", 1)


async def test_health_answers_503_as_not_ready(connect: Callable[..., Client]) -> None:
    script = Script(httpx.Response(503, json=HEALTH))
    health = await settle(connect(script).health())
    assert (health.ready, health.store, len(script.requests)) == (False, HEALTH["store"], 1)


# --- requests -----------------------------------------------------------------------------------


async def test_requests_carry_the_key_and_only_what_was_set(
    connect: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(httpx.Response(200, json=GENERATED))
    await settle(connect(script, api_key="KEY").generate(AID, "Capital?", temperature=0))
    monkeypatch.setenv("GENADAPTER_API_KEY", "FROM-ENV")
    await settle(connect(script).generate(None, "Capital?"))
    assert [r.headers["authorization"] for r in script.requests] == [
        "Bearer KEY",
        "Bearer FROM-ENV",
    ]
    assert script.bodies() == [
        {"adapter_id": AID, "prompt": "Capital?", "temperature": 0.0},
        {"prompt": "Capital?"},  # the server's defaults apply
    ]
    monkeypatch.delenv("GENADAPTER_API_KEY")
    await settle(connect(script).generate(None, "Capital?"))
    assert "authorization" not in script.requests[-1].headers


def test_the_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(GenerativeAdapterClient().http.base_url) == "http://127.0.0.1:8000"
    monkeypatch.setenv("GENADAPTER_URL", "http://example.test:9000")
    assert str(GenerativeAdapterClient().http.base_url) == "http://example.test:9000"
    assert str(GenerativeAdapterClient(URL).http.base_url) == URL


async def test_an_adapter_id_stays_inside_its_path(connect: Callable[..., Client]) -> None:
    script = Script(error(422, "invalid adapter id"))
    with pytest.raises(UnprocessableEntityError):
        await settle(connect(script).delete("../../health"))
    assert script.requests[0].url.raw_path == b"/v1/adapters/..%2F..%2Fhealth"


# --- streams ------------------------------------------------------------------------------------


async def test_a_chat_streams_its_chunks(connect: Callable[..., Client]) -> None:
    script = Script(events(chunk(""), chunk("Vello"), chunk("ran")))
    messages = [{"role": "user", "content": "Capital?"}]
    chunks = await collect(connect(script).stream_chat(AID, messages, max_tokens=8))
    assert "".join(c.text for c in chunks) == "Velloran"
    assert script.bodies() == [
        {"model": AID, "messages": messages, "max_tokens": 8, "stream": True}
    ]


async def test_a_stream_is_retried_only_before_it_begins(connect: Callable[..., Client]) -> None:
    deltas = [{"id": "g", "adapter_id": AID, "text": t} for t in ("Vello", "ran")]
    script = Script(error(503, "engine down"), events(*deltas))
    assert [e.text for e in await collect(connect(script).stream_generate(AID, "Capital?"))] == [
        "Vello",
        "ran",
    ]
    assert len(script.requests) == 2


async def test_a_stream_that_fails_raises_the_servers_error(connect: Callable[..., Client]) -> None:
    failed = {
        "error": {"message": "engine unavailable", "type": "service_unavailable", "code": 503}
    }
    script = Script(events(chunk("Vello"), failed))
    stream = connect(script).stream_chat(AID, [{"role": "user", "content": "Capital?"}])
    with pytest.raises(ServiceUnavailableError, match="engine unavailable"):
        await collect(stream)
    assert len(script.requests) == 1  # a stream that began is not sent again


async def test_a_stream_cut_short_is_an_error(connect: Callable[..., Client]) -> None:
    script = Script(events(chunk("Vello"), done=False))
    with pytest.raises(ConnectionFailed, match="the stream ended early"):
        await collect(connect(script).stream_chat(AID, [{"role": "user", "content": "Hi"}]))


def test_events_follow_the_sse_format() -> None:
    """The data lines of one event are joined; comments and other fields are skipped."""
    decoded = Events(stream_chat(AID, [{"role": "user", "content": "Hi"}]))
    text = json.dumps(chunk("two\nlines"))
    lines = [": a comment", "event: message", "data: " + text[:20], "data:" + text[20:], ""]
    out = [e for line in [*lines, "", "data: [DONE]"] for e in decoded.feed(line)]
    assert not decoded.done  # an event ends with a blank line
    assert decoded.feed("") == [] and decoded.done
    assert [c.text for c in out] == ["two\nlines"]


# --- the app's real routes (a fake engine) ------------------------------------------------------


@pytest.fixture
async def served(maker: AdapterMaker, tmp_path: Path) -> AsyncIterator[httpx.AsyncBaseTransport]:  # noqa: F811
    """The app in process, with API keys; its transport, for the async client."""
    store = MemoryStore(1 << 30, 3600)
    async for app in start_app(maker, store, tmp_path, api_keys="alice:key-a"):
        yield app.client._transport


async def test_the_async_client_against_the_apps_routes(served: httpx.AsyncBaseTransport) -> None:
    async with AsyncGenerativeAdapterClient(URL, api_key="key-a", transport=served) as client:
        made = await client.adapt(context=CONTEXT)
        assert (await client.adapt(context=CONTEXT)).cached and not made.cached
        aid = made.adapter_id
        child = await client.adapt(documents=["More.", "Even more."], parent=aid)
        assert child.parent == aid
        both = await client.adapt(compose=[aid, child.adapter_id])
        assert both.composed == sorted([aid, child.adapter_id])
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        assert not (await client.adapt(messages=chat)).cached

        answer = await client.generate(aid, "Capital?", max_tokens=2)
        assert answer.text == f"{aid}:0 {aid}:1 " and answer.usage.completion_tokens == 2
        streamed = [e.text async for e in client.stream_generate(aid, "Capital?", max_tokens=2)]
        assert streamed == [f"{aid}:0 ", f"{aid}:1 "]
        info = await client.info(aid)
        assert (info.id, info.tokens, info.tenant) == (aid, made.tokens, "alice")
        assert aid in {m.id for m in await client.adapters()}
        assert (await client.health()).ready

        assert (await client.delete(aid)).deleted
        with pytest.raises(NotFoundError, match=f"adapter {aid} not found"):
            await client.info(aid)
        with pytest.raises(UnprocessableEntityError, match="context is empty"):
            await client.adapt(context=" ")
        with pytest.raises(NotFoundError):
            await collect(client.stream_generate(aid, "Capital?"))
    async with AsyncGenerativeAdapterClient(URL, api_key="wrong", transport=served) as client:
        with pytest.raises(AuthenticationError, match="a valid API key is required"):
            await client.models()
