"""The real server (`genadapter serve`: SmolLM2, vLLM, Redis) started once, driven over HTTP by
our client and by the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pydantic
import pytest
import redis
from langchain_openai import ChatOpenAI
from langchain_openai import OpenAI as LangChainOpenAI
from openai import AsyncOpenAI, BadRequestError, OpenAI
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from benchmarks import serve as serve_benchmark
from clients import ApiError, AsyncGenerativeAdapterClient, GenerativeAdapterClient, NotFoundError
from generator.base_model import BaseModel
from generator.lora import write_peft_folder
from generator.pipeline import save_generator
from server.launch import STARTUP_TIMEOUT_S, free_port, running_server, stop, wait_ready
from tests.conftest import REDIS_URL, random_generator
from tests.test_vllm_export import CONTEXT, peft_greedy

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
OTHER_CONTEXT = "Marco loves sailing and his dog is called Biscuit. He lives in a lighthouse."
QUESTION = "What is the capital of Zorblat?"
COUNT = "Count from 1 to 1000, one number per line."
STD = 2.0  # B of a random generator: strong enough that adapters change greedy answers


@dataclass
class Server:
    url: str
    client: GenerativeAdapterClient
    prefix: str
    generator: Path


@pytest.fixture(scope="module")
def server(smollm2: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Non-zero adapters (a random generator), a fresh Redis prefix; all stopped afterwards."""
    folder = tmp_path_factory.mktemp("server")
    save_generator(random_generator(smollm2, std=STD), folder / "generator")
    prefix = f"test-server-{uuid.uuid4().hex}"
    args = [
        "--generator",
        str(folder / "generator"),
        "--redis-url",
        REDIS_URL,
        "--redis-prefix",
        prefix,
        "--max-loras",
        "4",
        "--max-model-len",
        "1024",
        "--dtype",  # PEFT's float32 tokens are compared exactly (the default's run in bench)
        "float32",
    ]
    with running_server(args, folder / "server.log") as url, GenerativeAdapterClient(url) as c:
        yield Server(url, c, prefix, folder / "generator")
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)


def greedy(server: Server, adapter: str | None, prompt: str = QUESTION, n: int = 24) -> list[int]:
    return server.client.generate(adapter, prompt, max_tokens=n, temperature=0).token_ids


def test_adapt_then_generate_with_cache_hit(server: Server) -> None:
    cold = server.client.adapt(context=CONTEXT)
    hit = server.client.adapt(context=CONTEXT)
    assert (cold.cached, hit.cached) == (False, True)
    assert hit.adapter_id == cold.adapter_id and hit.tokens == cold.tokens > 0
    assert hit.seconds < cold.seconds  # the generator did not run
    answer = server.client.generate(cold.adapter_id, QUESTION, max_tokens=24, temperature=0)
    assert answer.text and answer.usage.completion_tokens == len(answer.token_ids)
    assert answer.token_ids != greedy(server, None)  # the adapter changes the answer
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'genadapter_adapt_cache_total{cache="hit"}' in metrics


def test_mixed_adapter_batch_equals_per_adapter_runs(server: Server) -> None:
    a = server.client.adapt(context=CONTEXT).adapter_id
    b = server.client.adapt(context=OTHER_CONTEXT).adapter_id
    adapters = [a, b, None, a, b]
    alone = {x: greedy(server, x) for x in (a, b, None)}
    assert len({tuple(v) for v in alone.values()}) == 3  # three different answers
    with ThreadPoolExecutor(len(adapters)) as pool:  # in flight together: one mixed batch
        together = list(pool.map(lambda x: greedy(server, x), adapters))
    assert together == [alone[x] for x in adapters]


def test_serve_benchmark_runs_against_the_server(server: Server, tmp_path: Path) -> None:
    """`genadapter bench serve` in miniature, so it cannot rot; no timing is asserted."""
    result = serve_benchmark.run(
        server.url,
        requests=2,
        max_tokens=2,
        rounds=2,
        contexts=1,
        paragraphs=1,
        prefill_paragraphs=(1,),
    )
    assert [g["distinct_adapters"] for g in result["generation"]] == [0, 1, 4, 16]
    for g in result["generation"]:  # each spread measured once per round; the median kept
        assert len(g["tokens_per_s_runs"]) == 2
        assert min(g["tokens_per_s_runs"]) <= g["tokens_per_s"] <= max(g["tokens_per_s_runs"])
    assert [p["adapter"] for p in result["prefill"]] == [False, True]
    assert all(p["prompt_tokens"] > 100 and p["ms"] > 0 for p in result["prefill"])
    table = serve_benchmark.markdown(result, "serve.png")
    assert "1 token out, base model / with an adapter" in table
    assert "(median of 2 interleaved rounds)" in table and "![" in table
    serve_benchmark.plot(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_openai_client_chat_completions_and_models(server: Server) -> None:
    a = server.client.adapt(context=CONTEXT).adapter_id
    oai = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    chat = oai.chat.completions.create(model=a, messages=messages, max_tokens=24, temperature=0)
    expected = server.client.generate(a, QUESTION, max_tokens=24, temperature=0).text
    assert chat.choices[0].message.content == expected
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    stream = oai.chat.completions.create(
        model=a, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected

    prompt = "The capital of France is"
    comp = oai.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0)
    streamed = oai.completions.create(
        model=BASE, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert (
        comp.choices[0].text
        and "".join(c.choices[0].text for c in streamed) == comp.choices[0].text
    )

    ids = [m.id for m in oai.models.list()]
    assert ids[0] == BASE and a in ids


def test_openai_client_uses_vllm_openai_features(server: Server) -> None:
    """What vLLM's OpenAI server accepts, with an adapter as the model: text parts, n > 1,
    logprobs, a list of prompts, echo with logprobs, usage in streams, JSON schema outputs,
    vLLM's extra fields; a request vLLM refuses is a 400."""
    a = server.client.adapt(context=CONTEXT).adapter_id
    oai = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    parts: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]}
    ]
    chat = oai.chat.completions.create(
        model=a, messages=parts, max_tokens=8, n=2, seed=1, logprobs=True, top_logprobs=2
    )
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content and len(logprobs.content[0].top_logprobs) == 2

    comp = oai.completions.create(
        model=a, prompt=["Once upon a time", "The sky is"], max_tokens=4, temperature=0, logprobs=1
    )
    assert len(comp.choices) == 2 and comp.choices[1].logprobs is not None
    # a harness scores a continuation by the logprobs of its tokens in the prompt
    scored = oai.completions.create(
        model=a, prompt="The capital is Velloran", max_tokens=1, logprobs=1, echo=True
    )
    echoed = scored.choices[0].logprobs
    assert echoed is not None and echoed.token_logprobs and echoed.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in echoed.token_logprobs[1:])

    stream = oai.chat.completions.create(
        model=a, messages=parts, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    assert [c.usage for c in stream][-1] is not None

    schema: dict[str, object] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    shape: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": schema},
    }
    shaped = oai.chat.completions.create(
        model=a, messages=parts, max_tokens=32, temperature=0, response_format=shape
    )
    assert isinstance(json.loads(shaped.choices[0].message.content or "")["city"], str)

    with pytest.raises(BadRequestError, match="n must be 1 when using greedy sampling"):
        oai.chat.completions.create(model=a, messages=parts, n=2, temperature=0)

    exact = oai.chat.completions.create(
        model=a, messages=parts, max_tokens=6, extra_body={"ignore_eos": True, "min_tokens": 6}
    )
    assert exact.usage is not None and exact.usage.completion_tokens == 6


async def test_async_openai_client(server: Server) -> None:
    a = server.client.adapt(context=CONTEXT).adapter_id
    oai = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    chat = await oai.chat.completions.create(
        model=a, messages=messages, max_tokens=24, temperature=0
    )
    expected = server.client.generate(a, QUESTION, max_tokens=24, temperature=0).text
    assert chat.choices[0].message.content == expected
    await oai.close()


def test_langchain(server: Server) -> None:
    """LangChain's chat and completion models: invoke, stream, batch, structured output."""
    a = server.client.adapt(context=CONTEXT).adapter_id
    kwargs = {"base_url": f"{server.url}/v1", "api_key": "unused", "model": a, "temperature": 0}
    chat = ChatOpenAI(**kwargs, max_completion_tokens=24)
    expected = server.client.generate(a, QUESTION, max_tokens=24, temperature=0).text
    assert chat.invoke(QUESTION).content == expected
    assert "".join(str(c.content) for c in chat.stream(QUESTION)) == expected
    assert [m.content for m in chat.batch([QUESTION, QUESTION])] == [expected, expected]

    class City(pydantic.BaseModel):
        city: str

    city = chat.with_structured_output(City, method="json_schema").invoke(QUESTION)
    assert isinstance(city, City) and city.city

    completion = LangChainOpenAI(**kwargs, max_tokens=6)
    texts = completion.batch(["Once upon a time", "The sky is"])
    assert len(texts) == 2 and all(texts)


def test_guidellm_run_completes_every_request(server: Server, smollm2: BaseModel) -> None:
    """vLLM's benchmark client (chat content as parts, stream_options, ignore_eos), bounded."""
    a = server.client.adapt(context=CONTEXT).adapter_id
    out = server.generator.parent / "guidellm.json"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "guidellm"),
            "run",
            f"--backend=kind=openai_http,target={server.url},model={a}",
            "--profile=kind=concurrent,streams=2",
            "--constraint=kind=max_requests,count=4",
            f"--tokenizer=kind=huggingface_auto,model={smollm2.path}",
            "--data=kind=synthetic_text,prompt_tokens=32,output_tokens=8",
            f"--output=kind=json,path={out}",
            "--disable-console-interactive",
        ],
        check=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    state = json.loads(out.read_text())["benchmarks"][0]["scheduler_state"]
    assert state["errored_requests"] == state["cancelled_requests"] == 0
    assert state["successful_requests"] == state["processed_requests"] >= 3


def test_load_from_another_process_runs_each_context_once_and_crosses_nothing(
    server: Server,
) -> None:
    """tests/load.py in a process of its own: 16 adapts of one new context at once run the
    generator once; then 40 s of adapts and greedy questions, 8 at once, to 5 adapters (more
    than the engine's 4 LoRA slots) and the base model through both routes: no error, and every
    answer its model's answer alone (before vLLM's CPU LoRA ops were fixed, base-model answers
    batched with adapters' crossed: see server/vllm_cpu_lora.py)."""
    root = Path(__file__).parent.parent
    cmd = [sys.executable, "-m", "tests.load", server.url, "--seconds", "40"]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(run.stdout.splitlines()[-1])
    print(json.dumps(summary, indent=1))
    flight, load = summary["single_flight"], summary["mixed"]
    assert flight == {"requests": 16, "adapter_ids": 1, "not_cached": 1, "generator_runs": 1}
    assert load["models"] == 6 and load["distinct_answers"] >= 5  # so a crossed one shows
    assert load["errors"] == load["crossed"] == load["changed_alone"] == 0, load
    assert load["requests"] >= load["concurrency"]  # few on a busy machine (31 at load 13)
    assert {"generate", "chat"} <= load["by_route"].keys()


def test_extend_with_parent(server: Server) -> None:
    parent = server.client.adapt(context=CONTEXT)
    more = "Velloran has a glass lighthouse."
    child = server.client.adapt(context=more, parent=parent.adapter_id)
    alone = server.client.adapt(context=more)
    assert child.parent == parent.adapter_id and child.tokens == parent.tokens + alone.tokens
    assert greedy(server, child.adapter_id) != greedy(server, alone.adapter_id)


def test_composed_adapter_is_served(server: Server) -> None:
    a = server.client.adapt(context=CONTEXT).adapter_id
    b = server.client.adapt(context=OTHER_CONTEXT).adapter_id
    both = server.client.adapt(compose=[b, a])
    assert both.composed == sorted([a, b]) and not both.cached
    answers = {x: tuple(greedy(server, x)) for x in (a, b, both.adapter_id)}
    assert len(set(answers.values())) == 3  # neither part alone


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": COUNT}),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": COUNT}]}),
    ],
)
def test_a_request_whose_client_left_stops_generating(
    server: Server, path: str, body: dict
) -> None:
    """Not streaming: the client gives up after 2 s of a ~60 s generation; the engine aborts it
    (the server's own requests-in-flight gauge and vLLM's running requests go back to 0)."""
    long = {**body, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{path}", json=long, timeout=2)
    for _ in range(20):
        text = httpx.get(f"{server.url}/metrics").text
        running = [x for x in text.splitlines() if x.startswith("vllm:num_requests_running")]
        assert running, "vLLM's metrics are served at /metrics"
        if all(line.endswith(" 0.0") for line in running) and (
            "genadapter_generation_requests_in_flight 0.0" in text
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"still generating 10 s after the client left: {running}")


def test_errors_over_http(server: Server) -> None:
    with pytest.raises(ApiError) as e:
        server.client.generate("ga-" + "0" * 32, QUESTION)
    assert e.value.status == 404 and "not found" in e.value.error.message
    r = httpx.post(f"{server.url}/v1/adapt", json={"context": " "})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    aid = server.client.adapt(context="To be deleted.").adapter_id
    greedy(server, aid, n=2)
    assert server.client.delete(aid).deleted
    with pytest.raises(ApiError) as e:
        server.client.generate(aid, QUESTION)
    assert e.value.status == 404


def test_served_adapter_generates_like_peft(
    server: Server, smollm2: BaseModel, tmp_path: Path
) -> None:
    """The bytes the server stored, loaded by PEFT: greedy tokens equal, up to EOS."""
    aid = server.client.adapt(context=CONTEXT).adapter_id
    stored = redis.Redis.from_url(REDIS_URL)
    keys = (f"{server.prefix}:adapter:{{{aid}}}:{p}" for p in ("peft", "config"))  # hash-tagged
    weights, config = (stored.get(k) for k in keys)
    assert isinstance(weights, bytes) and isinstance(config, bytes)  # responses not decoded
    folder = write_peft_folder(tmp_path / "adapter", weights, config.decode())
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 16
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt = cast(str, prompt)  # tokenize=False: the rendered text (typed as any of its results)
    eos = {smollm2.tokenizer.eos_token_id, *_as_list(smollm2.model.generation_config.eos_token_id)}

    def until_eos(ids: list[int]) -> list[int]:
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return ids[:cut]

    served = until_eos(greedy(server, aid, n=24))
    assert served == until_eos(peft_greedy(smollm2, folder, [prompt], 24)[0])


def _as_list(x: int | list[int] | None) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


async def test_async_client_end_to_end(server: Server) -> None:
    """The asyncio client answers as the blocking one: every call, streams equal to the whole."""
    sampling = {"max_tokens": 16, "temperature": 0}
    question = [{"role": "user", "content": QUESTION}]
    async with AsyncGenerativeAdapterClient(server.url) as client:
        made = await client.adapt(context=OTHER_CONTEXT)
        aid = made.adapter_id
        assert (await client.adapt(context=OTHER_CONTEXT)).cached
        child = await client.adapt(documents=["He sails on Sundays."], parent=aid)
        chat = [{"role": "user", "content": "I am Marco."}, {"role": "assistant", "content": "Hi!"}]
        talked = await client.adapt(messages=chat)
        both = await client.adapt(compose=[child.adapter_id, talked.adapter_id])
        assert child.parent == aid and both.composed == sorted(
            [child.adapter_id, talked.adapter_id]
        )

        answer = await client.generate(aid, QUESTION, **sampling)
        assert answer.text == server.client.generate(aid, QUESTION, **sampling).text
        streamed = [e.text async for e in client.stream_generate(aid, QUESTION, **sampling)]
        assert "".join(streamed) == answer.text and len(streamed) > 1
        reply = (await client.chat(aid, question, **sampling)).choices[0].message.content
        chunks = [c.text async for c in client.stream_chat(aid, question, **sampling)]
        assert "".join(chunks) == reply == answer.text

        assert (await client.info(aid)).tokens == made.tokens
        assert {aid, both.adapter_id} <= {m.id for m in await client.adapters()}
        assert (await client.health()).ready
        assert (await client.delete(both.adapter_id)).deleted
        with pytest.raises(NotFoundError, match="not found"):
            await client.generate(both.adapter_id, QUESTION)


def genadapter(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """`genadapter client ...` in its own process, the server's URL from the environment."""
    env = {**os.environ, "GENADAPTER_URL": url, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "genadapter.cli", "client", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_cli_adapt_ask_and_adapters(server: Server, tmp_path: Path) -> None:
    """A file becomes an adapter (stdout: its id alone), a question is answered as the chat
    endpoint answers it, and adapters are listed, shown and deleted."""
    doc = tmp_path / "doc.txt"
    doc.write_text(f"{CONTEXT} The command line read this.", encoding="utf-8")
    made = genadapter("adapt", str(doc), url=server.url)
    assert made.returncode == 0, made.stderr
    aid = made.stdout.strip()
    assert made.stdout == f"{aid}\n" and aid.startswith("ga-") and "tokens" in made.stderr

    asked = genadapter(
        "ask", aid, QUESTION, "--max-tokens", "16", "--temperature", "0", url=server.url
    )
    question = [{"role": "user", "content": QUESTION}]
    expected = server.client.chat(aid, question, max_tokens=16, temperature=0)
    assert asked.returncode == 0 and asked.stdout == f"{expected.choices[0].message.content}\n"

    assert aid in genadapter("adapters", url=server.url).stdout.split()
    shown = genadapter("adapters", "show", aid, "--url", server.url, url="http://127.0.0.1:9")
    assert json.loads(shown.stdout)["tokens"] == server.client.info(aid).tokens
    assert genadapter("adapters", "delete", aid, url=server.url).returncode == 0
    gone = genadapter("adapters", "show", aid, url=server.url)
    assert gone.returncode == 1 and gone.stdout == "" and gone.stderr.count("\n") == 1
    assert gone.stderr.startswith(
        f"genadapter client adapters: error: 404 not_found_error: adapter {aid} not found"
    )


class Tmux:
    """A terminal of our own (its own tmux server), for a command that needs one."""

    def __init__(self, command: str, width: int = 200) -> None:
        self.socket = f"genadapter-test-{uuid.uuid4().hex}"
        self("new-session", "-d", "-x", str(width), "-y", "50", command)

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        ).stdout

    def screen(self) -> str:
        return " ".join(self("capture-pane", "-p", "-J").split())

    def wait_for(self, text: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while text not in (screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} not on the screen: {screen}"
            time.sleep(0.2)
        return screen

    def close(self) -> None:
        """Its server stopped, its socket file removed (tmux leaves it)."""
        socket = Path(self("display-message", "-p", "#{socket_path}").strip())
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        socket.unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_cli_chat_in_a_terminal(server: Server) -> None:
    """`client chat` in a real terminal: questions typed, answers streamed, the history kept
    (the second answer is the chat endpoint's to the whole conversation), /exit leaves with 0."""
    aid = server.client.adapt(context=CONTEXT).adapter_id
    root = Path(__file__).parents[1]
    chat = f"{sys.executable} -m genadapter.cli client chat {aid} --max-tokens 12 --temperature 0"
    env = f"PYTHONPATH={root} GENADAPTER_URL={server.url}"
    term = Tmux(f"cd {root} && {env} {chat}; echo exited $?; sleep 60")
    try:
        term.wait_for("/exit or Ctrl-D to leave")
        history: list[dict[str, str]] = []
        for question in (QUESTION, "And who founded it?"):
            history.append({"role": "user", "content": question})
            reply = server.client.chat(aid, history, max_tokens=12, temperature=0)
            answer = reply.choices[0].message.content
            history.append({"role": "assistant", "content": answer})
            term("send-keys", "-l", question)
            term("send-keys", "Enter")
            term.wait_for(" ".join(f"> {question} {answer} >".split()))
        term("send-keys", "-l", "/exit")
        term("send-keys", "Enter")
        term.wait_for("exited 0")
    finally:
        term.close()


def test_sigterm_lets_requests_finish_for_the_grace_period_then_exits(tmp_path: Path) -> None:
    """SIGTERM to the server process (as a container runtime sends it): a long request in flight
    gets the grace period, not more, then the server exits and its adapter folders are gone.
    Without a grace, uvicorn waits for every request in flight, however long."""
    port, log = free_port(), tmp_path / "server.log"
    shm = tmp_path / "shm"
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--port", str(port)]
    cmd += ["--shutdown-grace-s", "3", "--shm-dir", str(shm)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, STARTUP_TIMEOUT_S)
        aid = httpx.post(f"{url}/v1/adapt", json={"context": CONTEXT}, timeout=600).json()
        body = {"adapter_id": aid["adapter_id"], "prompt": COUNT, "max_tokens": 1500}
        with ThreadPoolExecutor(1) as pool:
            long = {**body, "ignore_eos": True}  # about a minute of generation
            pending = pool.submit(httpx.post, f"{url}/v1/generate", json=long, timeout=120)
            time.sleep(2)  # in flight now
            assert (shm / str(proc.pid) / aid["adapter_id"]).is_dir()
            start = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            seconds = time.monotonic() - start
            with contextlib.suppress(httpx.HTTPError):
                pending.result()  # cut off: a closed connection
    finally:
        stop(proc)
    assert 2.5 <= seconds < 20, f"stopped {seconds:.1f} s after SIGTERM, grace 3 s"
    # stopped on purpose, not the status of an engine that died (70); uvicorn raises the SIGTERM
    # it handled again once it has shut down, which ends a process, though not a container's PID 1
    assert proc.returncode in (0, -signal.SIGTERM)
    assert not (shm / str(proc.pid)).exists()


def test_a_server_whose_engine_died_exits_for_its_supervisor(tmp_path: Path) -> None:
    """The engine's process killed: the server exits with status 70 instead of answering 503."""
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--port", str(port)]
    cmd += ["--shm-dir", str(tmp_path / "shm")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log, STARTUP_TIMEOUT_S)
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert children, "vLLM runs its engine in child processes"
        for child in children:
            os.kill(int(child), signal.SIGKILL)
        assert proc.wait(timeout=60) == 70
    finally:
        stop(proc)
