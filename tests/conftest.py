"""Shared fixtures: a tiny random Llama for fast unit tests, the real SmolLM2 for slow ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from generator.base_model import BaseModel, load_base_model
from generator.config import GeneratorConfig
from generator.model import AdapterGenerator
from generator.pipeline import AdapterPipeline

TEXT = ("The river Quenmar flows north through the valley of Velloran. Farmers there grow purple "
        "barley and trade it in the market every Thursday. ") * 12
BROWN = "A Brown corpus sample. " * 50


def write_data(folder: Path) -> Path:
    """Train and validation splits of every source, each a few rows about TEXT."""
    folder.mkdir(parents=True)
    rows = {
        "pretrain": [{"text": TEXT, "lang": "en", "source": "wikipedia"},
                     {"text": "Ein deutscher Text. " * 50, "lang": "de", "source": "wikipedia"},
                     {"text": BROWN, "lang": "en", "source": "brown"}],
        "qa_conflicts": [{"context": TEXT, "question": "What do farmers grow?",
                          "answer": "purple barley", "answers": ["purple barley"]}],
        "qa_rc": [{"context": TEXT, "question": "When is the market?", "answer": "Thursday",
                   "answers": ["Thursday"]}],
        "cls": [{"task": "t", "input": f"sentence {i}", "label": "yes" if i % 2 else "no",
                 "labels": ["yes", "no"]} for i in range(20)],
    }
    for name, data in rows.items():
        (folder / f"{name}_train.jsonl").write_text("\n".join(json.dumps(r) for r in data))
    for name in ("qa_conflicts", "qa_rc"):  # validation: the same passages, other questions
        (folder / f"{name}_validation.jsonl").write_text(json.dumps(
            {"context": TEXT, "question": "Which river flows north?", "answer": "Quenmar"}))
    return folder


def tiny_llama(folder: Path) -> BaseModel:
    """A 2-layer random Llama saved to `folder` (PEFT reloads it from there)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.save_pretrained(folder)
    return BaseModel(name="tiny-llama", path=folder, model=model, tokenizer=None)  # type: ignore[arg-type]


def random_generator(base: BaseModel, std: float = 0.05, **overrides: object) -> AdapterGenerator:
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


@pytest.fixture(scope="session")
def smollm2() -> BaseModel:
    return load_base_model()
