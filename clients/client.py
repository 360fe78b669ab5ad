"""The typed client, blocking and asyncio: the same calls (clients/wire.py), two thin transports.

with GenerativeAdapterClient("http://127.0.0.1:8000") as client:
    adapter = client.adapt(context=open("doc.txt").read())
    print(client.generate(adapter.adapter_id, "What is the capital?").text)

async with AsyncGenerativeAdapterClient() as client:   # $GENADAPTER_URL or 127.0.0.1:8000
    adapter = await client.adapt(context=open("doc.txt").read())
    messages = [{"role": "user", "content": "What is the capital?"}]
    async for chunk in client.stream_chat(adapter.adapter_id, messages):
        print(chunk.text, end="")

Each method's signature and docstring are its builder's in wire.py. Errors are the server's, typed
(clients/errors.py); a connection that failed or a 503 is retried with backoff (`retry`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from clients import wire
from clients.wire import TIMEOUT_S, Call, Events, Outcome, Retry, StreamCall

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(build: Callable[P, Call[T]]) -> Callable[Concatenate[GenerativeAdapterClient, P], T]:
    @functools.wraps(build)
    def method(self: GenerativeAdapterClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(build(*args, **kwargs))

    return method


def _blocking_stream(
    build: Callable[P, StreamCall[T]],
) -> Callable[Concatenate[GenerativeAdapterClient, P], Iterator[T]]:
    @functools.wraps(build)
    def method(self: GenerativeAdapterClient, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._stream(build(*args, **kwargs))

    return method


def _async(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncGenerativeAdapterClient, P], Coroutine[Any, Any, T]]:
    @functools.wraps(build)
    async def method(self: AsyncGenerativeAdapterClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(build(*args, **kwargs))

    return method


def _async_stream(
    build: Callable[P, StreamCall[T]],
) -> Callable[Concatenate[AsyncGenerativeAdapterClient, P], AsyncIterator[T]]:
    @functools.wraps(build)
    def method(
        self: AsyncGenerativeAdapterClient, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncIterator[T]:
        return self._stream(build(*args, **kwargs))

    return method


class GenerativeAdapterClient:
    """Blocking client; thread-safe (one httpx.Client), usable as a context manager. The URL and
    API key default to $GENADAPTER_URL (else http://127.0.0.1:8000) and $GENADAPTER_API_KEY.
    A stream is sent when first iterated; breaking out of it closes it."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = TIMEOUT_S,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self.http = httpx.Client(
            **wire.http_options(base_url, api_key, timeout_s), transport=transport
        )

    def __enter__(self) -> GenerativeAdapterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, call: Call[T]) -> T:
        return call.parse(self._send(call).json())

    def _stream(self, call: StreamCall[T]) -> Iterator[T]:
        response = self._send(call)
        events = Events(call)
        try:
            with call.reading(response):
                for line in response.iter_lines():
                    yield from events.feed(line)
                    if events.done:
                        return
            events.finish()
        finally:
            response.close()

    def _send(self, call: Call[Any]) -> httpx.Response:
        request = self.http.build_request(call.method, call.path, json=call.json())
        for wait in self.retry.waits():
            time.sleep(wait)
            outcome = self._attempt(request, call.stream)
            if not call.retried(outcome):
                break
        return call.checked(outcome, request.url)

    def _attempt(self, request: httpx.Request, stream: bool) -> Outcome:
        try:
            response = self.http.send(request, stream=stream)
        except httpx.TransportError as e:
            return e
        if response.is_error:
            response.read()
        return response

    adapt = _blocking(wire.adapt)
    generate = _blocking(wire.generate)
    stream_generate = _blocking_stream(wire.stream_generate)
    chat = _blocking(wire.chat)
    stream_chat = _blocking_stream(wire.stream_chat)
    models = _blocking(wire.models)
    adapters = _blocking(wire.adapters)
    info = _blocking(wire.info)
    delete = _blocking(wire.delete)
    health = _blocking(wire.health)


class AsyncGenerativeAdapterClient:
    """The same calls for asyncio (one httpx.AsyncClient), usable as an async context manager;
    the URL and API key default as the blocking client's. A stream is sent when first iterated;
    one left early is closed by `contextlib.aclosing(client.stream_chat(...))`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = TIMEOUT_S,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self.http = httpx.AsyncClient(
            **wire.http_options(base_url, api_key, timeout_s), transport=transport
        )

    async def __aenter__(self) -> AsyncGenerativeAdapterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, call: Call[T]) -> T:
        return call.parse((await self._send(call)).json())

    async def _stream(self, call: StreamCall[T]) -> AsyncIterator[T]:
        response = await self._send(call)
        events = Events(call)
        try:
            with call.reading(response):
                async for line in response.aiter_lines():
                    for event in events.feed(line):
                        yield event
                    if events.done:
                        return
            events.finish()
        finally:
            await response.aclose()

    async def _send(self, call: Call[Any]) -> httpx.Response:
        request = self.http.build_request(call.method, call.path, json=call.json())
        for wait in self.retry.waits():
            await asyncio.sleep(wait)
            outcome = await self._attempt(request, call.stream)
            if not call.retried(outcome):
                break
        return call.checked(outcome, request.url)

    async def _attempt(self, request: httpx.Request, stream: bool) -> Outcome:
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.TransportError as e:
            return e
        if response.is_error:
            await response.aread()
        return response

    adapt = _async(wire.adapt)
    generate = _async(wire.generate)
    stream_generate = _async_stream(wire.stream_generate)
    chat = _async(wire.chat)
    stream_chat = _async_stream(wire.stream_chat)
    models = _async(wire.models)
    adapters = _async(wire.adapters)
    info = _async(wire.info)
    delete = _async(wire.delete)
    health = _async(wire.health)
