"""The typed client (blocking and asyncio alike) and `genadapter client`, without a real server:
scripted answers (httpx.MockTransport) for the retry policy, errors and events, and the app's real
routes in process (a fake engine) for the wire format. The real server: tests/test_server.py."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
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
from genadapter import client as cli
from genadapter.cli import main
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


# --- `genadapter client` ------------------------------------------------------------------------


class FakeServer:
    """Enough of the server for the commands: adapt, chat (an answer naming the turn, streamed),
    models, show and delete; every request kept."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, body = request.url.path, json.loads(request.content or "null")
        if path == "/v1/adapt":
            made = {"adapter_id": AID, "tokens": 9, "cached": False, "created_at": 0}
            return httpx.Response(200, json={**made, "base_model": "base", "seconds": 1.5})
        if path == "/v1/chat/completions":
            if body["model"] != AID:
                return error(404, f"model {body['model']} not found", "not_found_error")
            turn = sum(m["role"] == "user" for m in body["messages"])
            return events(chunk("answer "), chunk(f"{turn}"))
        if path == "/v1/models":
            cards = [{"id": "base"}, {"id": AID, "created": 86400, "parent": "base"}]
            return httpx.Response(200, json={"data": cards})
        if request.method == "DELETE":
            return httpx.Response(200, json={"id": AID, "deleted": True})
        info = {"id": AID, "created_at": 0, "tokens": 9, "base_model": "base", "lora_rank": 16}
        return httpx.Response(200, json={**info, "fingerprint": "f"})

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.content]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    connect = functools.partial(GenerativeAdapterClient, transport=httpx.MockTransport(fake))
    monkeypatch.setattr(cli, "GenerativeAdapterClient", connect)
    return fake


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["client", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_adapt_prints_the_id_and_reads_files_as_documents(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First document.")
    b.write_text("Second document.")
    assert run(["adapt", str(a)], capsys) == (0, f"{AID}\n", "9 tokens, made in 1.5 s\n")
    assert run(["adapt", str(a), str(b), "--parent", AID], capsys)[:2] == (0, f"{AID}\n")
    assert fake.bodies() == [
        {"context": "First document."},
        {"documents": ["First document.", "Second document."], "parent": AID},
    ]


def test_ask_streams_the_answer(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ask", AID, "Capital?", "--temperature", "0"], capsys) == (0, "answer 1\n", "")
    question = [{"role": "user", "content": "Capital?"}]
    assert fake.bodies() == [
        {"model": AID, "messages": question, "temperature": 0.0, "stream": True}
    ]


def test_chat_keeps_the_history_until_exit(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("First?\n\nSecond?\n/exit\nnever sent\n"))
    code, out, err = run(["chat", AID], capsys)
    assert (code, out) == (0, "> answer 1\n> > answer 2\n> ")  # a blank line asks again
    assert "/exit or Ctrl-D" in err
    assert fake.bodies()[-1]["messages"] == [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "Second?"},
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Only?\n"))  # EOF ends it too
    assert run(["chat", AID], capsys)[:2] == (0, "> answer 1\n> ")


def test_adapters_list_show_delete(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    listed = (0, f"{AID}\t1970-01-02 00:00:00 UTC\n", "")
    assert run(["adapters"], capsys) == run(["adapters", "list"], capsys) == listed
    code, out, _ = run(["adapters", "--url", URL, "show", AID], capsys)
    assert code == 0 and json.loads(out)["tokens"] == 9
    assert run(["adapters", "delete", AID, "--url", URL], capsys) == (0, "", f"deleted {AID}\n")
    assert [(r.method, str(r.url)) for r in fake.requests[-2:]] == [
        ("GET", f"{URL}/v1/adapters/{AID}"),
        ("DELETE", f"{URL}/v1/adapters/{AID}"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["ask", "ga-unknown", "Hi"],
            "ask: error: 404 not_found_error: model ga-unknown not found",
        ),
        (["chat", "ga-unknown"], "chat: error: ga-unknown is not a model of this server"),
        (["adapt", "missing.txt"], "adapt: error: [Errno 2] No such file or directory"),
        (["adapt", "--parent", "nope", __file__], "adapt: error: parent: String should match"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(argv, capsys)
    assert (code, out) == (1, "") and err.startswith(f"genadapter client {message}")
    assert err.count("\n") == 1


def test_an_unreachable_server_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cli, "GenerativeAdapterClient", functools.partial(GenerativeAdapterClient, retry=FAST)
    )
    code, _, err = run(["adapters", "--url", "http://127.0.0.1:9"], capsys)
    assert code == 1 and err == (
        "genadapter client adapters: error: GET http://127.0.0.1:9/v1/models: "
        "ConnectError: [Errno 111] Connection refused\n"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_elapsed_time_shows_on_a_terminal_only() -> None:
    terminal, pipe = Terminal(), io.StringIO()
    for out in (terminal, pipe):
        with cli.elapsed("adapting...", out):
            time.sleep(3 * cli.TICK_S)
    assert re.search(r"\radapting\.\.\. \d+\.\d s", terminal.getvalue())
    assert terminal.getvalue().endswith("\r\033[K")  # cleared for what follows
    assert pipe.getvalue() == ""


def test_the_client_commands_import_no_torch() -> None:
    """`genadapter client` starts without the generator, the server or torch (a client-only
    install has none of them)."""
    code = (
        "import sys\nfrom genadapter.cli import main\n"
        "try:\n    main(['client', 'chat', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'generator', 'fastapi', 'server.service'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.endswith("[]\n"), run.stderr
