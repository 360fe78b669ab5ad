"""Shared fixtures: a tiny random Llama for fast unit tests, the real SmolLM2 for slow ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from generator.base_model import BaseModel, load_base_model
from generator.config import GeneratorConfig
from generator.model import AdapterGenerator
from generator.pipeline import AdapterPipeline


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
