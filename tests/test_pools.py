"""Separate pools: a server of role adapt (the generator, no engine) and one of role generate
(the engine, no generator), real processes sharing Redis, as replicas of each pool would."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from generator.base_model import BaseModel
from generator.pipeline import save_generator
from server.launch import running_server
from tests.conftest import REDIS_URL, random_generator
from tests.test_server import QUESTION, STD
from tests.test_vllm_export import CONTEXT


@pytest.mark.slow
def test_an_adapter_made_by_the_adapt_pool_is_served_by_the_generate_pool(
    smollm2: BaseModel, tmp_path: Path, prefix: str
) -> None:
    save_generator(random_generator(smollm2, std=STD), tmp_path / "generator")
    shared = ["--generator", str(tmp_path / "generator"), "--redis-url", REDIS_URL]
    shared += ["--redis-prefix", prefix]
    with contextlib.ExitStack() as stack:
        adapt, generate = [
            stack.enter_context(
                running_server([*shared, "--role", role, "--max-model-len", "1024"], log)
            )
            for role, log in (("adapt", tmp_path / "adapt.log"), ("generate", tmp_path / "gen.log"))
        ]
        for url, role in ((adapt, "adapt"), (generate, "generate")):
            assert httpx.get(f"{url}/health").json()["role"] == role
        r = httpx.post(f"{adapt}/v1/adapt", json={"context": CONTEXT}, timeout=300)
        aid = r.json()["adapter_id"]

        chat = OpenAI(base_url=f"{generate}/v1", api_key="unused").chat.completions
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
        answers = [
            chat.create(model=m, messages=messages, max_tokens=24, temperature=0)
            for m in (aid, "SmolLM2-135M-Instruct")
        ]
        adapted, base = (a.choices[0].message.content for a in answers)
        assert answers[0].model == aid and adapted and adapted != base  # the adapter answered

        body = {"model": aid, "messages": messages}
        assert httpx.post(f"{adapt}/v1/chat/completions", json=body).status_code == 501
        r = httpx.post(f"{generate}/v1/adapt", json={"context": CONTEXT})
        assert r.status_code == 501 and "role is 'generate'" in r.json()["error"]["message"]
