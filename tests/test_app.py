"""The HTTP app with a fake engine and a tiny model: every route, every error path.

The adapter maker is real (a 2-layer random Llama with a byte-level tokenizer and a chat
template); only vLLM is replaced, by an engine that echoes which adapter folder it was handed.
Tests that need Redis are marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
import torch
from fastapi import Request
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import load
from schemathesis import Case, GenerationMode
from vllm.entrypoints.serve.engine.protocol import ErrorInfo

from genadapter.cli import build_parser, settings_overrides
from generator.lora import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, peft_bytes
from generator.maker import AdapterMaker, MadeAdapter, Reading, ServedModel, load_served_model
from generator.model import add_states
from generator.pipeline import AdapterPipeline, save_generator, state_from_bytes
from server import engine as engine_module
from server.auth import ApiKeys
from server.engine import (
    ENGINE_DIED,
    Delta,
    LoRA,
    LoRAFolders,
    SamplingOptions,
    VllmEngine,
    engine_args,
)
from server.errors import EngineUnavailable
from server.launch import free_port
from server.main import create_app, serve
from server.protocol import AdapterInfo
from server.settings import Settings
from server.store import AdapterStore, MemoryStore, RedisStore, StoredAdapter
from server.vllm_openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAIResult,
)
from tests.conftest import REDIS_URL, random_generator, tiny_llama
from tests.redis_servers import redis_server

CONTEXT = "Zorblat is a small planet. Its capital is Velloran, famous for purple oceans."


class Answer(BaseModel):
    model: str
    text: str


class FakeOpenAI:
    """Stands in for vLLM's OpenAI layer: answers with the name of the LoRA known for `model`
    (its folder must exist), as events when asked to stream, or an error for an unknown model."""

    def __init__(self) -> None:
        self.loras: dict[str, LoRA] = {}
        self.requests: list[ChatCompletionRequest | CompletionRequest] = []

    def add(self, lora: LoRA) -> None:
        self.loras[lora.name] = lora

    def remove(self, name: str) -> None:
        self.loras.pop(name, None)

    async def chat(
        self, request: ChatCompletionRequest, raw: Request | None = None
    ) -> OpenAIResult:
        return self.answer(request)

    async def complete(
        self, request: CompletionRequest, raw: Request | None = None
    ) -> OpenAIResult:
        return self.answer(request)

    def answer(self, request: ChatCompletionRequest | CompletionRequest) -> OpenAIResult:
        self.requests.append(request)
        if request.model in self.loras:
            assert (self.loras[request.model].path / PEFT_WEIGHTS_FILE).is_file()
        elif request.model != "tiny-chat-llama":
            return ErrorResponse(error=ErrorInfo(message="unknown", type="NotFound", code=404))
        answer = Answer(model=str(request.model), text=f"answered by {request.model}")
        return events(answer) if request.stream else answer


async def events(answer: Answer) -> AsyncGenerator[str, None]:
    yield f"data: {answer.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


class FakeEngine:
    """Yields `max_tokens` deltas naming the adapter; checks its folder is really there."""

    def __init__(self, settings: Settings, model: ServedModel) -> None:
        self.fail_after: int | None = None  # raise after this many deltas
        self.healthy = True
        self.loras: list[LoRA | None] = []
        self.openai = FakeOpenAI()
        self.busy_asked = 0  # times the generator asked before a window

    async def start(self) -> None:
        return None

    async def generate(
        self, prompt_ids: list[int], options: SamplingOptions, lora: LoRA | None, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        self.loras.append(lora)
        if lora is not None:
            assert (lora.path / PEFT_WEIGHTS_FILE).is_file()
        tag = "base" if lora is None else lora.name
        for i in range(options.max_tokens):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("worker died")
            last = i == options.max_tokens - 1
            yield Delta(f"{tag}:{i} ", [i], "length" if last else None)

    def busy(self) -> bool:
        self.busy_asked += 1
        return False

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineUnavailable("engine unavailable: fake engine down")

    def shutdown(self) -> None:
        self.healthy = False


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> AdapterPipeline:
    base = tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), "tiny-chat-llama")
    return AdapterPipeline(base, random_generator(base, window=16, rank=8, inner_size=32))


@pytest.fixture(scope="module")
def maker(pipeline: AdapterPipeline) -> AdapterMaker:
    return AdapterMaker(pipeline)


class App:
    """A started app, its HTTP client, fake engine and store."""

    def __init__(
        self, client: httpx.AsyncClient, engine: FakeEngine, store: AdapterStore, settings: Settings
    ) -> None:
        self.client, self.engine, self.store, self.settings = client, engine, store, settings

    async def adapt(self, **body: object) -> dict:
        r = await self.client.post("/v1/adapt", json=body)
        assert r.status_code == 200, r.text
        return r.json()


async def start_app(
    maker: AdapterMaker, store: AdapterStore, tmp_path: Path, **overrides: Any
) -> AsyncIterator[App]:
    settings = Settings(
        shm_dir=tmp_path / "shm",
        max_context_tokens=200,
        max_model_len=256,
        max_body_bytes=1 << 16,
        **overrides,
    )
    engine = FakeEngine(settings, maker)  # started unless the role is adapt
    app = create_app(settings, maker=maker, store=store, engine_factory=lambda s, m: engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield App(client, engine, store, settings)


@pytest.fixture
async def app(maker: AdapterMaker, tmp_path: Path) -> AsyncIterator[App]:
    async for a in start_app(maker, MemoryStore(1 << 30, 3600), tmp_path):
        yield a


def assert_error(r: httpx.Response, status: int, text: str) -> dict:
    """OpenAI's error shape, the right status, and a message that says what is wrong."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"], error["message"]
    return error


def foreign_info(aid: str, **change: object) -> AdapterInfo:
    """Metadata of an adapter made by another generator (another fingerprint), and `change`."""
    info = AdapterInfo(
        id=aid,
        created_at=0,
        tokens=1,
        base_model="tiny-chat-llama",
        fingerprint="another generator",
        lora_rank=8,
    )
    return info.model_copy(update=change)


def as_json(body: dict | None) -> dict:
    """Request arguments with `body` as JSON text: escapes such as \\ud800 (a lone surrogate,
    valid JSON) reach the server as sent."""
    if body is None:
        return {}
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def sse_events(text: str) -> list[str]:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return lines[:-1]


# --- the happy paths ---------------------------------------------------------------------------


async def test_adapt_cache_generate_info_models_delete(app: App) -> None:
    first = await app.adapt(context=CONTEXT)
    aid = first["adapter_id"]
    assert aid.startswith("ga-") and first["cached"] is False and first["tokens"] > 0
    assert app.engine.busy_asked > 0  # the generator let the engine's requests go first
    again = await app.adapt(context=CONTEXT)
    assert (again["adapter_id"], again["cached"]) == (aid, True)
    alias = (await app.client.post("/adapt", json={"context": CONTEXT})).json()
    assert (alias["adapter_id"], alias["cached"]) == (aid, True)

    r = await app.client.post(
        "/v1/generate", json={"adapter_id": aid, "prompt": "Capital?", "max_tokens": 3}
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == f"{aid}:0 {aid}:1 {aid}:2 "
    assert r.json()["usage"]["completion_tokens"] == 3
    base = await app.client.post("/v1/generate", json={"prompt": "Capital?", "max_tokens": 1})
    assert base.json()["text"] == "base:0 "
    alias = await app.client.post("/generate", json={"prompt": "Capital?", "max_tokens": 1})
    assert alias.json()["text"] == "base:0 "  # the design's unversioned path

    info = (await app.client.get(f"/v1/adapters/{aid}")).json()
    assert (info["id"], info["tokens"], info["base_model"]) == (
        aid,
        first["tokens"],
        "tiny-chat-llama",
    )
    models = [m["id"] for m in (await app.client.get("/v1/models")).json()["data"]]
    assert models == ["tiny-chat-llama", aid]

    assert (await app.client.delete(f"/v1/adapters/{aid}")).json()["deleted"] is True
    r = await app.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "Capital?"})
    assert_error(r, 404, "not found")
    assert not (app.settings.shm_dir / str(os.getpid()) / aid).exists()


async def test_messages_and_documents_inputs(app: App) -> None:
    messages = [
        {"role": "user", "content": "I love sailing."},
        {"role": "assistant", "content": "Nice!"},
    ]
    by_messages = await app.adapt(messages=messages)
    assert (await app.adapt(messages=messages))["cached"] is True
    by_docs = await app.adapt(documents=["First document.", "Second one."])
    by_text = await app.adapt(context="First document.\n\nSecond one.")
    assert by_docs["adapter_id"] == by_text["adapter_id"]  # documents join with blank lines
    assert by_messages["adapter_id"] != by_docs["adapter_id"]


async def test_extend_with_parent(app: App) -> None:
    parent = await app.adapt(context=CONTEXT)
    child = await app.adapt(context="More: the moons are green.", parent=parent["adapter_id"])
    alone = await app.adapt(context="More: the moons are green.")
    assert child["parent"] == parent["adapter_id"]
    assert child["tokens"] == parent["tokens"] + alone["tokens"]
    assert len({child["adapter_id"], alone["adapter_id"], parent["adapter_id"]}) == 3
    child_entry, alone_entry = [await app.store.get(x["adapter_id"]) for x in (child, alone)]
    assert child_entry is not None and alone_entry is not None
    assert child_entry.adapter.peft != alone_entry.adapter.peft  # the parent's state carried over


async def test_compose_adds_up_the_states_of_adapters(app: App, pipeline: AdapterPipeline) -> None:
    """Composing A and B is the adapter of their raw states summed by hand, whatever the order,
    cached like any other; the generator does not read text again."""
    a = await app.adapt(context=CONTEXT)
    b = await app.adapt(context="Marco loves sailing and his dog is called Biscuit.")
    ab = await app.adapt(compose=[a["adapter_id"], b["adapter_id"]])
    ba = await app.adapt(compose=[b["adapter_id"], a["adapter_id"]])
    assert (ab["adapter_id"], ab["cached"], ba["cached"]) == (ba["adapter_id"], False, True)
    assert ab["composed"] == sorted([a["adapter_id"], b["adapter_id"]])
    assert ab["tokens"] == a["tokens"] + b["tokens"]

    entries = [await app.store.get(x["adapter_id"]) for x in (a, b, ab)]
    made = [e.adapter for e in entries if e is not None]
    assert len(made) == 3
    (state_a, _), (state_b, _) = (state_from_bytes(m.state) for m in made[:2])
    by_hand = pipeline.generator.lora(add_states(state_a, state_b))
    # equal up to float rounding: on some CPUs MKL rounds the same matmul differently from one
    # call to the next (1e-9 in lora_B measured; the cause was not pinned down)
    torch.testing.assert_close(load(made[2].peft), load(peft_bytes(by_hand)))
    info = (await app.client.get(f"/v1/adapters/{ab['adapter_id']}")).json()
    assert info["composed"] == ab["composed"]


async def test_compose_refuses_an_adapter_of_another_generator(app: App) -> None:
    a = (await app.adapt(context=CONTEXT))["adapter_id"]
    info = foreign_info("ga-" + "f" * 32)
    await app.store.put(StoredAdapter(info, MadeAdapter(b"peft", "{}", b"state", 1)))
    r = await app.client.post("/v1/adapt", json={"compose": [a, info.id]})
    assert_error(r, 409, "has fingerprint")


@pytest.fixture
def generator_runs(maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """One entry per generator run (the maker's start of a reading), for single-flight tests."""
    runs: list[object] = []
    real = maker.start

    def counting(ids: list[int], parent_state: bytes | None = None) -> Reading:
        runs.append(ids)
        return real(ids, parent_state)

    monkeypatch.setattr(maker, "start", counting)
    return runs


async def test_concurrent_adapts_of_one_context_run_the_generator_once(
    app: App, generator_runs: list[object]
) -> None:
    results = await asyncio.gather(*(app.adapt(context="Single flight.") for _ in range(6)))
    assert len(generator_runs) == 1
    assert [r["cached"] for r in results].count(False) == 1
    assert len({r["adapter_id"] for r in results}) == 1


async def test_openai_routes_resolve_adapters_for_the_openai_layer(app: App) -> None:
    """The `model` of a chat or completion request is made ready (fetched from the store, its
    folder written) and handed to the layer, which answers with vLLM's request classes."""
    aid = (await app.adapt(context=CONTEXT))["adapter_id"]
    parts = [{"type": "text", "text": "Hi"}]  # content as parts, as guidellm sends it
    chat = {"model": aid, "messages": [{"role": "user", "content": parts}], "n": 2}
    r = await app.client.post("/v1/chat/completions", json=chat)
    assert r.json() == {"model": aid, "text": f"answered by {aid}"}
    request = app.engine.openai.requests[-1]
    assert isinstance(request, ChatCompletionRequest) and request.n == 2

    r = await app.client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert [json.loads(e)["text"] for e in sse_events(r.text)] == [f"answered by {aid}"]

    comp = {"model": "tiny-chat-llama", "prompt": ["Once", "Twice"], "logprobs": 1}
    r = await app.client.post("/v1/completions", json=comp)
    assert r.json()["text"] == "answered by tiny-chat-llama"
    request = app.engine.openai.requests[-1]
    assert isinstance(request, CompletionRequest) and request.prompt == ["Once", "Twice"]

    r = await app.client.post("/v1/completions", json={**comp, "model": "gpt-x"})
    assert_error(r, 404, "model 'gpt-x' does not exist")  # ours, before the layer
    await app.client.delete(f"/v1/adapters/{aid}")
    assert_error(await app.client.post("/v1/chat/completions", json=chat), 404, "not found")
    assert aid not in app.engine.openai.loras  # its folder went, and the layer forgot it

    r = await app.client.post(
        "/v1/generate", json={"adapter_id": None, "prompt": "Hi", "max_tokens": 2, "stream": True}
    )
    assert [json.loads(e)["text"] for e in sse_events(r.text)] == ["base:0 ", "base:1 "]


def metric(text: str, sample: str) -> float:
    """A sample's value in Prometheus' text format (0 before its first use)."""
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(sample + " ")]
    return float(values[0]) if values else 0.0


async def test_health_and_metrics(app: App) -> None:
    r = await app.client.get("/health")
    health = {"ready": True, "role": "all", "engine": "ok", "store": "ok"}
    assert (r.status_code, r.json()) == (200, health)
    before = (await app.client.get("/metrics")).text  # the registry is shared by every test
    await app.adapt(context="metrics")
    await app.adapt(context="metrics")
    after = (await app.client.get("/metrics")).text
    for cache in ("hit", "miss"):
        sample = f'genadapter_adapt_cache_total{{cache="{cache}"}}'
        assert metric(after, sample) == metric(before, sample) + 1
        sample = f'genadapter_adapt_seconds_count{{cache="{cache}"}}'
        assert metric(after, sample) == metric(before, sample) + 1
    assert metric(after, "genadapter_adapt_queue_depth") == 0  # every adapt left the queue
    app.engine.healthy = False
    r = await app.client.get("/health")
    assert (r.status_code, r.json()["engine"]) == (503, "engine unavailable: fake engine down")


# --- bad input and faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"context": ""}, 422, "context is empty"),
        ({"context": "   \n"}, 422, "context is empty"),
        ({"documents": []}, 422, "context is empty"),
        ({"messages": []}, 422, "context is empty"),
        ({}, 422, "exactly one of context, messages, documents, compose"),
        ({"compose": ["ga-" + "1" * 32]}, 422, "at least 2 items"),
        ({"compose": ["ga-" + "1" * 32] * 2}, 422, "compose lists an adapter twice"),
        ({"compose": ["ga-" + "1" * 32, "nope"]}, 422, "compose.1: String should match"),
        (
            {"compose": ["ga-" + "1" * 32, "ga-" + "2" * 32], "parent": "ga-" + "3" * 32},
            422,
            "compose takes no parent",
        ),
        ({"compose": ["ga-" + "1" * 32, "ga-" + "2" * 32]}, 404, "compose adapter"),
        ({"context": "a", "documents": ["b"]}, 422, "exactly one of"),
        ({"context": 5}, 422, "context: Input should be a valid string"),
        ({"documents": "not a list"}, 422, "documents: Input should be a valid list"),
        ({"context": "a", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"context": "x \ud800 y"}, 422, "context: Value error, invalid Unicode at character 2"),
        ({"documents": ["ok", "\udfff"]}, 422, "documents.1: Value error, invalid Unicode"),
        ({"context": "a", "parent": "../../etc/passwd"}, 422, "parent: String should match"),
        ({"context": "word " * 300}, 413, "context has 1500 tokens; the limit is 200"),
        ({"context": "word " * 600}, 413, "context has at least 250 tokens"),  # not tokenized
        ({"context": "word " * 20_000}, 413, "request body over 65536 bytes"),
        ({"context": "a", "parent": "ga-" + "0" * 32}, 404, "parent adapter"),
    ],
)
async def test_adapt_rejects_bad_input(app: App, body: dict, status: int, text: str) -> None:
    assert_error(await app.client.post("/v1/adapt", **as_json(body)), status, text)
    assert await app.store.list("") == []


async def test_a_body_over_the_limit_sent_in_chunks_is_413(app: App) -> None:
    """No Content-Length to go by: refused once the bytes received pass the limit."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b'{"context": "'
        for _ in range(100):
            yield b"word " * 200
        yield b'"}'

    r = await app.client.post("/v1/adapt", content=chunks())
    assert_error(r, 413, "request body over 65536 bytes")
    assert await app.store.list("") == []


async def test_malformed_json_is_422(app: App) -> None:
    r = await app.client.post(
        "/v1/adapt", content=b'{"context": "a"', headers={"content-type": "application/json"}
    )
    assert_error(r, 422, "JSON decode error")


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "text"),
    [
        ("GET", "/v1/adapters/ga-" + "0" * 32, None, 404, "not found"),
        ("DELETE", "/v1/adapters/ga-" + "0" * 32, None, 404, "not found"),
        ("GET", "/v1/adapters/ga-..%2F..%2Fetc", None, 404, "Not Found"),
        ("GET", "/v1/adapters/ga-ZZ", None, 422, "invalid adapter id"),
        ("POST", "/v1/generate", {"adapter_id": "ga-" + "0" * 32, "prompt": "x"}, 404, "not found"),
        (
            "POST",
            "/v1/generate",
            {"adapter_id": "ga-../../../tmp/x", "prompt": "x"},
            422,
            "invalid adapter id",
        ),
        ("POST", "/v1/generate", {"prompt": "x", "max_tokens": 0}, 422, "greater than or equal"),
        ("POST", "/v1/generate", {"prompt": "x", "temperature": "hot"}, 422, "valid number"),
        ("POST", "/v1/generate", {"prompt": "x", "max_tokens": 1000}, 400, "max_model_len 256"),
        ("POST", "/v1/generate", {"prompt": "x\ud800"}, 422, "prompt: Value error, invalid"),
        ("POST", "/v1/generate", {"prompt": "x", "stop": ""}, 422, "stop: Value error"),
        ("POST", "/v1/generate", {"prompt": "x", "stop": ["a", ""]}, 422, "must not be empty"),
        ("POST", "/v1/generate", {"prompt": "x", "seed": 2**64}, 422, "seed: Input should be"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model 'gpt-4' does not exist",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "ga-" + "1" * 32, "messages": [{"role": "user", "content": "x"}]},
            404,
            "not found",
        ),
        (
            "POST",
            "/v1/completions",
            {"model": "ga-/../x", "prompt": "x"},
            422,
            "invalid adapter id",
        ),
        ("POST", "/v1/completions", {}, 422, "Either prompt or prompt_embeds must be provided"),
        ("POST", "/v1/chat/completions", {"messages": False}, 422, "vLLM cannot read it"),
    ],
)
async def test_request_errors(
    app: App, method: str, url: str, body: dict | None, status: int, text: str
) -> None:
    r = await app.client.request(method, url, **as_json(body))
    assert_error(r, status, text)
    assert app.engine.loras == []  # nothing reached the engine
    assert not app.settings.shm_dir.exists()  # no folder was written, anywhere


async def test_stored_adapter_for_another_setup_is_a_clear_409(app: App) -> None:
    changes: list[dict[str, str | int]] = [{"base_model": "other-model"}, {"lora_rank": 64}]
    for n, change in enumerate(changes):
        aid = f"ga-{n:032x}"
        info = foreign_info(aid, **change)
        await app.store.put(StoredAdapter(info, MadeAdapter(b"peft", "{}", b"state", 1)))
        field = next(iter(change))
        r = await app.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "x"})
        assert_error(r, 409, f"has {field}")
        r = await app.client.post("/v1/adapt", json={"context": "x", "parent": aid})
        assert_error(r, 409, f"has {field}")
    assert app.engine.loras == []


async def test_an_adapter_is_served_with_the_config_it_was_stored_with(app: App) -> None:
    """vLLM gets the PEFT config made with the weights, not one rebuilt from this server's
    generator, which may target other modules than the generator that made the adapter."""
    stored = await app.store.get((await app.adapt(context=CONTEXT))["adapter_id"])
    assert stored is not None
    made = stored.adapter
    config = json.loads(made.peft_config)
    assert config["target_modules"] == ["o_proj"]
    other = json.dumps({**config, "target_modules": ["down_proj", "o_proj"]})
    info = foreign_info("ga-" + "e" * 32)
    await app.store.put(StoredAdapter(info, MadeAdapter(made.peft, other, made.state, 1)))
    r = await app.client.post("/v1/generate", json={"adapter_id": info.id, "prompt": "x"})
    assert r.status_code == 200, r.text
    lora = app.engine.loras[-1]
    assert lora is not None
    assert (lora.path / PEFT_CONFIG_FILE).read_text() == other


async def test_failed_generation_leaves_nothing(
    app: App, maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(maker, "read_next", crash)
    r = await app.client.post("/v1/adapt", json={"context": CONTEXT})
    error = assert_error(r, 500, "internal error")
    assert "out of memory" not in error["message"]  # internals stay in the log
    assert await app.store.list("") == []
    monkeypatch.undo()
    assert (await app.adapt(context=CONTEXT))["cached"] is False


async def test_engine_failures(app: App) -> None:
    aid = (await app.adapt(context=CONTEXT))["adapter_id"]
    app.engine.fail_after = 0  # fails before any output: a plain HTTP error
    body = {"adapter_id": aid, "prompt": "x", "max_tokens": 3}
    assert_error(await app.client.post("/v1/generate", json=body), 503, "worker died")
    app.engine.fail_after = 1  # fails mid-stream: an error line, then [DONE]
    r = await app.client.post("/v1/generate", json={**body, "stream": True})
    events = sse_events(r.text)
    assert json.loads(events[0])["text"] == f"{aid}:0 "
    assert "worker died" in json.loads(events[-1])["error"]["message"]
    text = (await app.client.get("/metrics")).text
    assert metric(text, "genadapter_generation_requests_in_flight") == 0  # both failures ended


# --- Redis down, full or evicting --------------------------------------------------------------


@pytest.mark.slow
async def test_redis_down_is_503_and_the_server_recovers(
    maker: AdapterMaker, tmp_path: Path
) -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", ttl_s=3600)
    async for app in start_app(maker, store, tmp_path):
        with redis_server(tmp_path / "redis", port=port):
            aid = (await app.adapt(context=CONTEXT))["adapter_id"]
        for r in (
            await app.client.post("/v1/adapt", json={"context": CONTEXT}),
            await app.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "x"}),
            await app.client.get(f"/v1/adapters/{aid}"),
        ):
            assert_error(r, 503, f"Redis at redis://127.0.0.1:{port}/0) unavailable")
        health = await app.client.get("/health")
        assert health.status_code == 503 and "unavailable" in health.json()["store"]
        base = await app.client.post("/v1/generate", json={"prompt": "x", "max_tokens": 1})
        assert base.status_code == 200  # the base model needs no store

        with redis_server(tmp_path / "redis", port=port):  # back, empty (no persistence)
            assert (await app.client.get("/health")).status_code == 200
            again = await app.adapt(context=CONTEXT)
            assert (again["adapter_id"], again["cached"]) == (aid, False)


@pytest.mark.slow
async def test_a_redis_that_refuses_writes_fails_health(
    maker: AdapterMaker, tmp_path: Path, generator_runs: list[object]
) -> None:
    """A full Redis (noeviction) still answers PING: /health's write probe tells it, with
    Redis's reason and without the password, and an adapt is a 503 before the generator runs."""
    with redis_server(tmp_path / "redis", "--maxmemory-policy", "noeviction") as url:
        admin = RedisStore(url, 60).redis
        await admin.config_set("requirepass", "s3cret")
        store = RedisStore(url.replace("redis://", "redis://:s3cret@"), ttl_s=3600)
        async for app in start_app(maker, store, tmp_path):
            assert (await app.client.get("/health")).status_code == 200
            await admin.config_set("maxmemory", "1")
            health = await app.client.get("/health")
            assert health.status_code == 503
            assert "refuses writes: OOM command not allowed" in health.json()["store"]
            r = await app.client.post("/v1/adapt", json={"context": CONTEXT})
            assert_error(r, 503, "OOM command not allowed")
            assert generator_runs == []  # its lock could not be taken: nothing ran for nothing
            assert "s3cret" not in health.text + r.text
            await admin.config_set("maxmemory", "0")
            assert (await app.client.get("/health")).status_code == 200
        await admin.aclose()


@pytest.mark.slow
async def test_an_evicted_adapter_is_a_404_and_leaves_the_listing(
    maker: AdapterMaker, tmp_path: Path, prefix: str
) -> None:
    """Redis under allkeys-lru evicts keys one by one: an adapter that lost one is not listed,
    and using it is a 404 that says to adapt again (which makes it anew)."""
    store = RedisStore(REDIS_URL, ttl_s=3600, prefix=prefix)
    async for app in start_app(maker, store, tmp_path):
        aid = (await app.adapt(context=CONTEXT))["adapter_id"]
        kept = (await app.adapt(context="Another context."))["adapter_id"]
        await app.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "x"})  # in use
        await store.redis.delete(store._key(aid, "peft"))  # what eviction leaves
        models = [m["id"] for m in (await app.client.get("/v1/models")).json()["data"]]
        assert aid not in models and kept in models
        chat = {"model": aid, "messages": [{"role": "user", "content": "x"}]}
        for r in (
            await app.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "x"}),
            await app.client.post("/v1/chat/completions", json=chat),
            await app.client.get(f"/v1/adapters/{aid}"),
        ):
            assert_error(r, 404, "it expired (unused past its TTL, or evicted from a full store)")
            assert "adapt its context again" in r.json()["error"]["message"]
        assert (await app.adapt(context=CONTEXT))["cached"] is False


@pytest.mark.slow
async def test_two_servers_sharing_redis_share_adapters(
    maker: AdapterMaker, tmp_path: Path, generator_runs: list[object], prefix: str
) -> None:
    """Made by one process, served by another (from Redis), generated once for both."""
    async with contextlib.AsyncExitStack() as stack:
        one, two = [
            await stack.enter_async_context(
                contextlib.asynccontextmanager(start_app)(
                    maker, RedisStore(REDIS_URL, 60, prefix=prefix), tmp_path / str(i)
                )
            )
            for i in range(2)
        ]
        results = await asyncio.gather(one.adapt(context=CONTEXT), two.adapt(context=CONTEXT))
        assert len(generator_runs) == 1 and sorted(r["cached"] for r in results) == [False, True]
        aid = results[0]["adapter_id"]
        r = await two.client.post(
            "/v1/generate", json={"adapter_id": aid, "prompt": "x", "max_tokens": 1}
        )
        assert r.json()["text"] == f"{aid}:0 "


async def test_openapi_describes_every_route(app: App) -> None:
    """/docs renders from this: vLLM's request classes included (its OpenAI fields listed)."""
    spec = (await app.client.get("/openapi.json")).json()
    paths = {"/v1/adapt", "/adapt", "/v1/generate", "/generate", "/v1/chat/completions"}
    assert paths <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"AdaptResponse", "GenerateResponse"} <= set(schemas)  # answers documented
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"messages", "n", "logprobs", "response_format", "stream_options"} <= set(chat)


FUZZ_CASES = 300  # drawn over every operation, inputs valid and not: about half a minute
FUZZ_TIMEOUT_S = 10  # a request answered later than this counts as a hang


def fuzzed_request(case: Case) -> dict[str, Any]:
    """A case schemathesis drew as httpx's arguments. A JSON body is written by json.dumps, so
    a lone surrogate arrives escaped, as any client may send it."""
    args = case.as_transport_kwargs(base_url="http://test")
    if "json" in args:
        args["content"] = json.dumps(args.pop("json"))
    elif "data" in args:
        args["content"] = args.pop("data")
    return {k: args[k] for k in ("method", "url", "headers", "params", "content") if k in args}


async def test_requests_fuzzed_from_the_openapi_schema_get_no_5xx(app: App) -> None:
    """Every operation of /openapi.json with inputs schemathesis draws from it, valid and not:
    none is answered with a 5xx or hangs, and the server is healthy after."""
    schema = schemathesis.openapi.from_dict((await app.client.get("/openapi.json")).json())
    modes = [GenerationMode(m) for m in ("positive", "negative")]
    cases = st.one_of([schema.as_strategy(mode) for mode in modes])
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()

    @hypothesis.settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=cases)
    def fuzz(case: Case) -> None:  # in a thread: hypothesis drives a function, not a coroutine
        request = app.client.request(**fuzzed_request(case))
        r = asyncio.run_coroutine_threadsafe(request, loop).result(FUZZ_TIMEOUT_S)
        statuses[r.status_code] += 1
        assert r.status_code < 500, f"{case.as_curl_command()}\n{r.status_code} {r.text}"

    await asyncio.to_thread(fuzz)
    print(f"fuzzed {statuses.total()} requests; statuses {sorted(statuses.items())}")
    assert statuses.total() >= FUZZ_CASES / 2 and {200, 422} <= statuses.keys()
    assert (await app.client.get("/health")).status_code == 200
    text = (await app.client.get("/metrics")).text
    assert metric(text, "genadapter_generation_requests_in_flight") == 0  # every one ended


# --- API keys and tenants ----------------------------------------------------------------------


async def test_each_tenant_sees_only_its_own_adapters(maker: AdapterMaker, tmp_path: Path) -> None:
    """Keys map to tenants; another tenant's adapter is a 404 exactly like one never made, in
    every route, and an equal text of two tenants makes two adapters (no shared cache hit)."""
    store = MemoryStore(1 << 30, 3600)
    async for app in start_app(maker, store, tmp_path, api_keys="alice:key-a, bob:key-b"):
        alice, bob = ({"Authorization": f"Bearer key-{t}"} for t in "ab")
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}):
            r = await app.client.post("/v1/adapt", json={"context": CONTEXT}, headers=headers)
            assert_error(r, 401, "a valid API key is required")
        assert_error(await app.client.get("/v1/models"), 401, "API key")

        a = (await app.client.post("/v1/adapt", json={"context": CONTEXT}, headers=alice)).json()
        b = (await app.client.post("/v1/adapt", json={"context": CONTEXT}, headers=bob)).json()
        assert a["adapter_id"] != b["adapter_id"] and not a["cached"] and not b["cached"]
        aid = a["adapter_id"]
        chat = {"model": aid, "messages": [{"role": "user", "content": "Hi"}]}
        for method, url, body in [
            ("GET", f"/v1/adapters/{aid}", None),
            ("DELETE", f"/v1/adapters/{aid}", None),
            ("POST", "/v1/generate", {"adapter_id": aid, "prompt": "x"}),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/adapt", {"context": "more", "parent": aid}),
            ("POST", "/v1/adapt", {"compose": [aid, b["adapter_id"]]}),
        ]:
            r = await app.client.request(method, url, json=body, headers=bob)
            assert_error(r, 404, "not found")
        for headers, own in ((alice, aid), (bob, b["adapter_id"])):
            listed = (await app.client.get("/v1/models", headers=headers)).json()["data"]
            assert [m["id"] for m in listed][1:] == [own]
        info = (await app.client.get(f"/v1/adapters/{aid}", headers=alice)).json()
        assert info["tenant"] == "alice"
        r = await app.client.post(
            "/v1/generate", json={"adapter_id": aid, "prompt": "x"}, headers=alice
        )
        assert r.status_code == 200
        assert (await app.client.get("/health")).status_code == 200  # probes need no key


@pytest.mark.parametrize(
    ("settings", "needs_key"),
    [
        ({"api_keys": "alice:key-a"}, True),
        ({"api_keys": "alice:key-a", "public_docs": True}, False),
        ({}, False),  # development mode: no keys to ask for
    ],
)
async def test_docs_and_metrics_need_a_key_unless_public(
    maker: AdapterMaker, tmp_path: Path, settings: dict, needs_key: bool
) -> None:
    store = MemoryStore(1 << 30, 3600)
    async for app in start_app(maker, store, tmp_path, **settings):
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/metrics"):
            r = await app.client.get(path)
            if needs_key:
                assert_error(r, 401, "a valid API key is required")
                r = await app.client.get(path, headers={"Authorization": "Bearer key-a"})
            assert r.status_code == 200, (path, r.text)
        assert (await app.client.get("/health")).status_code == 200  # probes never need one


def test_api_keys_from_the_environment_and_a_file(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("# tenant key\ncarol key-c\n\n")
    keys = ApiKeys.load("alice:key-a,bob:key-b", file)
    assert [keys.tenant(f"Bearer key-{t}") for t in "abc"] == ["alice", "bob", "carol"]
    assert ApiKeys.load(None, None).tenant(None) == ""  # no keys: development mode
    with pytest.raises(ValueError, match="tenant:key"):
        ApiKeys.load("alice", None)


def test_serving_beyond_loopback_without_keys_is_refused() -> None:
    with pytest.raises(SystemExit, match="no API keys to serve on 0.0.0.0"):
        serve(Settings(host="0.0.0.0"))


async def test_a_tenant_over_its_request_rate_gets_429(maker: AdapterMaker, tmp_path: Path) -> None:
    store = MemoryStore(1 << 30, 3600)
    async for app in start_app(maker, store, tmp_path, tenant_requests_per_minute=3):
        for _ in range(3):
            assert (await app.client.get("/v1/models")).status_code == 200
        r = await app.client.get("/v1/models")
        assert_error(r, 429, "over 3 requests a minute")
        assert 1 <= int(r.headers["Retry-After"]) <= 20  # one request back in 20 s


async def test_a_tenant_over_its_adapts_at_once_gets_429(
    maker: AdapterMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two adapts of one tenant at a time: a third, while they run, is refused at once."""
    started, release = asyncio.Event(), asyncio.Event()
    real = maker.start

    def slow(ids: list[int], parent_state: bytes | None = None) -> Reading:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return real(ids, parent_state)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(maker, "start", slow)
    async for app in start_app(maker, MemoryStore(1 << 30, 3600), tmp_path, tenant_adapts=2):
        running = [asyncio.create_task(app.adapt(context=f"text {i}")) for i in range(2)]
        await started.wait()
        r = await app.client.post("/v1/adapt", json={"context": "a third"})
        assert_error(r, 429, "2 adapts of yours are already running")
        assert r.headers["Retry-After"] == "1"
        release.set()
        assert all(not x["cached"] for x in await asyncio.gather(*running))
        assert (await app.adapt(context="a third"))["cached"] is False  # slots are back


async def test_a_tenant_storing_its_limit_of_adapters_gets_429_for_a_new_one(
    maker: AdapterMaker, tmp_path: Path, generator_runs: list[object]
) -> None:
    """Two adapters stored: a third context (or composing them) is refused before the generator
    runs, a cache hit is not, another tenant is not; after a delete it may adapt again."""
    store = MemoryStore(1 << 30, 3600)
    keys = "alice:key-a,bob:key-b"
    async for app in start_app(maker, store, tmp_path, api_keys=keys, tenant_adapters=2):
        alice, bob = ({"Authorization": f"Bearer key-{t}"} for t in "ab")
        adapt = partial(app.client.post, "/v1/adapt")
        made = [await adapt(json={"context": f"text {i}"}, headers=alice) for i in range(2)]
        ids = [r.json()["adapter_id"] for r in made]
        runs = len(generator_runs)
        for body in ({"context": "a third"}, {"compose": ids}):
            r = await adapt(json=body, headers=alice)
            assert_error(r, 429, "you store 2 adapters, the limit is 2")
            retry = int(r.headers["Retry-After"])  # when the oldest can lapse, unused
            assert app.settings.adapter_ttl_s - 5 <= retry <= app.settings.adapter_ttl_s
        assert len(generator_runs) == runs  # refused before the generator ran
        assert (await adapt(json={"context": "text 0"}, headers=alice)).json()["cached"] is True
        assert (await adapt(json={"context": "a third"}, headers=bob)).status_code == 200
        await app.client.delete(f"/v1/adapters/{ids[0]}", headers=alice)
        again = await adapt(json={"context": "a third"}, headers=alice)
        assert again.json()["cached"] is False


def test_folders_of_processes_that_are_gone_are_removed(tmp_path: Path) -> None:
    """A server that exited abruptly left its adapter folders in RAM; the next one clears them."""
    gone, alive = tmp_path / "999999999", tmp_path / str(os.getppid())
    for folder in (gone, alive):
        (folder / "ga-x").mkdir(parents=True)
    LoRAFolders(tmp_path, capacity=2)
    assert not gone.exists() and alive.exists()


# --- roles: adapt and generate pools ------------------------------------------------------------


async def test_each_role_serves_its_part_and_refuses_the_other_with_501(
    maker: AdapterMaker, tmp_path: Path
) -> None:
    """A server of role adapt makes adapters that one of role generate, sharing its store,
    serves; each answers the other's endpoints with a 501 naming its role, even for a body
    that is not valid; both list and show adapters."""
    store = MemoryStore(1 << 30, 3600)  # shared, as Redis is by the servers of both pools
    async with contextlib.AsyncExitStack() as stack:
        adapt, generate = [
            await stack.enter_async_context(
                contextlib.asynccontextmanager(start_app)(maker, store, tmp_path / r, role=r)
            )
            for r in ("adapt", "generate")
        ]
        aid = (await adapt.adapt(context=CONTEXT))["adapter_id"]
        chat = {"model": aid, "messages": [{"role": "user", "content": "x"}]}
        refused = {
            adapt: [
                ("/v1/generate", {"adapter_id": aid, "prompt": "x"}),
                ("/generate", {"prompt": "x"}),
                ("/v1/chat/completions", chat),
                ("/v1/completions", {"model": aid, "prompt": "x"}),
            ],
            generate: [("/v1/adapt", {"context": "new"}), ("/adapt", {})],
        }
        for app, routes in refused.items():
            role, other = app.settings.role, "generate" if app is adapt else "adapt"
            for path, body in routes:
                r = await app.client.post(path, json=body)
                text = f"POST {path} is not served here: this server's role is {role!r}"
                assert assert_error(r, 501, text)["type"] == "not_implemented_error"
                assert f"send it to a server of role {other!r} or 'all'" in r.text
            models = [m["id"] for m in (await app.client.get("/v1/models")).json()["data"]]
            assert aid in models
            assert (await app.client.get(f"/v1/adapters/{aid}")).status_code == 200
        r = await generate.client.post("/v1/generate", json={"adapter_id": aid, "prompt": "x"})
        assert r.json()["text"].startswith(f"{aid}:0 ")
        r = await generate.client.post("/v1/chat/completions", json=chat)
        assert r.json()["text"] == f"answered by {aid}"
        assert adapt.engine.loras == [] and not adapt.engine.openai.requests
        assert (await adapt.client.get("/health")).json() == {
            "ready": True,
            "role": "adapt",
            "engine": "none: role 'adapt' runs no engine",
            "store": "ok",
        }
        health = await generate.client.get("/health")
        assert health.json() == {"ready": True, "role": "generate", "engine": "ok", "store": "ok"}


async def test_role_generate_loads_no_generator(
    pipeline: AdapterPipeline, maker: AdapterMaker, tmp_path: Path
) -> None:
    """Only the tokenizer and the generator's config (vLLM loads the base model's weights): the
    same tokens, rank and modules as the maker with its generator, and nothing to adapt with."""
    save_generator(pipeline.generator, tmp_path / "generator")
    model = load_served_model(pipeline.base.path, tmp_path / "generator")
    assert not isinstance(model, AdapterMaker)
    for field in ("base_model_path", "lora_rank", "target_modules", "max_token_chars"):
        assert getattr(model, field) == getattr(maker, field)
    assert model.tokenize(CONTEXT) == maker.tokenize(CONTEXT)
    settings = Settings(
        role="generate",
        base_model=str(pipeline.base.path),
        generator=tmp_path / "generator",
        shm_dir=tmp_path / "shm",
    )
    app = create_app(
        settings,
        store=MemoryStore(1 << 20, 60),
        engine_factory=FakeEngine,
    )
    async with app.router.lifespan_context(app):
        assert not isinstance(app.state.adapters.maker, AdapterMaker)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            assert_error(await client.post("/v1/adapt", json={"context": "x"}), 501, "'generate'")


def test_a_role_without_redis_is_refused() -> None:
    """A pool's servers share adapters through Redis; alone, a role would serve half a product."""
    for role in ("adapt", "generate"):
        with pytest.raises(SystemExit, match=f"role '{role}' shares its adapters"):
            serve(Settings(role=role))


def test_engine_args_carry_tensor_and_pipeline_parallelism(maker: AdapterMaker) -> None:
    """The flags reach vLLM's engine arguments (both 1 by default: one device)."""
    flags = ["serve", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2"]
    settings = Settings(**settings_overrides(build_parser().parse_args(flags)))
    args = engine_args(settings, maker)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (4, 2)
    assert (args.max_lora_rank, args.lora_target_modules) == (8, maker.target_modules)
    default = engine_args(Settings(), maker)
    assert (default.tensor_parallel_size, default.pipeline_parallel_size) == (1, 1)


async def test_an_engine_shut_down_on_purpose_is_not_taken_for_one_that_died(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM shuts the engine down, after which vLLM reports it errored: the server must exit as
    stopped, not with the status that asks its supervisor for a restart (a container's PID 1 did,
    as uvicorn's re-raised SIGTERM does not end it). An engine that died still exits so."""

    class FakeLLM:
        errored = False

        def shutdown(self) -> None:
            self.errored = True

    exits: list[int] = []
    monkeypatch.setattr(engine_module, "ENGINE_WATCH_S", 0.01)
    monkeypatch.setattr(engine_module.os, "_exit", exits.append)
    for on_purpose in (True, False):
        engine = object.__new__(VllmEngine)  # the watch alone: no vLLM
        engine.llm = FakeLLM()  # type: ignore[assignment]
        engine._watch = asyncio.create_task(engine._exit_if_dead())  # as start() does
        await asyncio.sleep(0.05)
        if on_purpose:
            engine.shutdown()
        else:
            engine.llm.errored = True  # type: ignore[misc]
        await asyncio.sleep(0.05)
        assert exits == ([] if on_purpose else [ENGINE_DIED])
