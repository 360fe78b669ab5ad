"""Shared fixtures: a tiny random Llama with a byte-level tokenizer for the fast tier, the real
SmolLM2 and Redis for the slow one (`pytest -m "not slow"` runs without either)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from generator.base_model import BaseModel, load_base_model
from generator.config import GeneratorConfig, GeneratorOptions
from generator.model import AdapterGenerator
from generator.pipeline import AdapterPipeline
from tests import redis_servers

if TYPE_CHECKING:
    from typing_extensions import Unpack

TEXT = (
    "The river Quenmar flows north through the valley of Velloran. Farmers there grow purple "
    "barley and trade it in the market every Thursday. "
) * 12
BROWN = "A Brown corpus sample. " * 50


def write_data(folder: Path) -> Path:
    """Train and validation splits of every source, each a few rows about TEXT."""
    folder.mkdir(parents=True)
    rows: dict[str, list[dict[str, object]]] = {
        "pretrain": [
            {"text": TEXT, "lang": "en", "source": "wikipedia"},
            {"text": "Ein deutscher Text. " * 50, "lang": "de", "source": "wikipedia"},
            {"text": BROWN, "lang": "en", "source": "brown"},
        ],
        "qa_conflicts": [
            {
                "context": TEXT,
                "question": "What do farmers grow?",
                "answer": "purple barley",
                "answers": ["purple barley"],
            }
        ],
        "qa_rc": [
            {
                "context": TEXT,
                "question": "When is the market?",
                "answer": "Thursday",
                "answers": ["Thursday"],
            }
        ],
        "cls": [
            {
                "task": "t",
                "input": f"sentence {i}",
                "label": "yes" if i % 2 else "no",
                "labels": ["yes", "no"],
            }
            for i in range(20)
        ],
    }
    for name, data in rows.items():
        (folder / f"{name}_train.jsonl").write_text("\n".join(json.dumps(r) for r in data))
    for name in ("qa_conflicts", "qa_rc"):  # validation: the same passages, other questions
        (folder / f"{name}_validation.jsonl").write_text(
            json.dumps(
                {"context": TEXT, "question": "Which river flows north?", "answer": "Quenmar"}
            )
        )
    return folder


REDIS_URL = "redis://127.0.0.1:6379/0"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte plus chat markers, with a ChatML template like SmolLM2's."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(folder: Path, name: str = "tiny-llama") -> BaseModel:
    """A 2-layer random Llama and its tokenizer, saved to `folder` (PEFT reloads it there)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return BaseModel(name=name, path=folder, model=model, tokenizer=tokenizer)


def random_generator(
    base: BaseModel, std: float = 0.05, **overrides: Unpack[GeneratorOptions]
) -> AdapterGenerator:
    """A generator whose B is random, so its adapters are non-zero (an untrained one is zero)."""
    config = GeneratorConfig.for_base_model(base.model, base.name, **overrides)
    torch.manual_seed(1)
    generator = AdapterGenerator(config)
    for p in generator.parameters():
        if p.dim() == 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=std)
    return generator


@pytest.fixture
def tiny_base(tmp_path: Path) -> BaseModel:
    return tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_pipeline(tiny_base: BaseModel) -> AdapterPipeline:
    return AdapterPipeline(tiny_base, random_generator(tiny_base, window=16, rank=8, inner_size=32))


# Fixtures that need what the fast tier runs without; a test using one must be marked slow.
SLOW_FIXTURES = {
    "smollm2": "the real SmolLM2",
    "prefix": "Redis",
    "redis_cluster": "a Redis Cluster",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fail the collection if a test reaches the real model or Redis unmarked."""
    for item in items:
        used = set(getattr(item, "fixturenames", ())) & SLOW_FIXTURES.keys()
        if used and item.get_closest_marker("slow") is None:
            what = " and ".join(SLOW_FIXTURES[f] for f in sorted(used))
            raise pytest.UsageError(f"{item.nodeid} uses {what}: mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def smollm2() -> BaseModel:
    """The real SmolLM2-135M-Instruct, loaded once per session."""
    return load_base_model()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh Redis key prefix; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex}"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A three-node Redis Cluster on loopback ports for the session: its nodes' URLs."""
    with redis_servers.redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as urls:
        yield urls
