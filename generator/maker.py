"""The generator as the server uses it: text and token ids in, an adapter's files out.

This is the one interface between serving and the torch code; no tensor crosses it. What it
returns is everything a stored adapter needs, together: the PEFT weights and config that vLLM
loads, and the raw state that extending the adapter later continues from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from generator.base_model import (
    BaseModelError,
    ReadingDType,
    cache_root,
    load_tokenizer,
    native_bfloat16,
    reading_dtype,
    tokenize,
)
from generator.config import GeneratorConfig
from generator.lora import write_peft_folder
from generator.pipeline import (
    DEFAULT_GENERATOR_DIR,
    Adapter,
    AdapterPipeline,
    EmptyContextError,
    GeneratorError,
    Reading,
    adapter_id,
    composed_id,
    load_config,
    load_pipeline,
    state_from_bytes,
)

__all__ = [
    "AdapterMaker",
    "BaseModelError",
    "EmptyContextError",
    "GeneratorError",
    "MadeAdapter",
    "ReadingDType",
    "Reading",
    "ServedModel",
    "cache_root",
    "load_maker",
    "load_served_model",
    "native_bfloat16",
]


@dataclass(frozen=True)
class MadeAdapter:
    """One adapter's files: what is stored, served and extended, always kept together."""

    peft: bytes  # adapter_model.safetensors
    peft_config: str  # adapter_config.json of the generator that made it
    state: bytes  # raw S and token count: what extending it continues from
    tokens: int  # context tokens it has read, its parents' included

    def write(self, folder: Path) -> Path:
        """A PEFT folder (what vLLM and PEFT load), written atomically."""
        return write_peft_folder(folder, self.peft, self.peft_config)


class ServedModel:
    """The base model as the engine serves it and the adapters as the generator shapes them:
    names, folder, tokenizer, LoRA rank and modules. A server of role `generate` loads only
    this: vLLM loads the weights, and no generator runs there."""

    def __init__(
        self, name: str, path: Path, tokenizer: PreTrainedTokenizerBase, config: GeneratorConfig
    ) -> None:
        self.base_model = name  # what users and the engine call it
        self.base_model_path = path  # the Hugging Face folder the engine serves
        self.lora_rank = config.lora_rank
        self.target_modules = sorted(config.modules)  # what its adapters change
        self._tokenizer = tokenizer
        # No token covers more characters than its own string has: a text of n characters has
        # at least n / max_token_chars tokens, which bounds a context's size before tokenizing.
        self.max_token_chars = max(len(token) for token in tokenizer.get_vocab())

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self._tokenizer, text)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Messages in the base model's chat template."""
        text = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return cast(str, text)  # tokenize=False: the rendered text (typed as any of its results)


class AdapterMaker(ServedModel):
    """The served model with its generator: token ids in, a MadeAdapter out."""

    def __init__(self, pipeline: AdapterPipeline) -> None:
        base = pipeline.base
        super().__init__(base.name, base.path, base.tokenizer, pipeline.config)
        self._pipeline = pipeline
        self.fingerprint = pipeline.fingerprint  # generator + base model: part of adapter ids

    def adapter_id(self, context: str, parent: str | None = None, tenant: str = "") -> str:
        return adapter_id(self.fingerprint, context, parent, tenant)

    def composed_id(self, adapter_ids: list[str], tenant: str = "") -> str:
        return composed_id(self.fingerprint, adapter_ids, tenant)

    def make(self, ids: list[int], parent_state: bytes | None = None) -> MadeAdapter:
        """The adapter of `ids`, continuing `parent_state` (a MadeAdapter.state) if given."""
        reading = self.start(ids, parent_state)
        while not reading.done:
            self.read_next([reading])
        return self.finish(reading)

    def start(self, ids: list[int], parent_state: bytes | None = None) -> Reading:
        """`make` a window at a time, batched with other contexts: start, `read_next` until
        done, `finish`. The reading is opaque to callers."""
        state, tokens = (None, 0) if parent_state is None else state_from_bytes(parent_state)
        return self._pipeline.start_reading(ids, state, tokens)

    def read_next(self, readings: list[Reading]) -> None:
        self._pipeline.read_next(readings)

    def pass_tokens(self, reading: Reading) -> int:
        """Tokens of `reading` its next `read_next` reads."""
        return self._pipeline.pass_tokens(reading)

    def finish(self, reading: Reading) -> MadeAdapter:
        return self._files(reading.adapter())

    def compose(self, states: list[bytes]) -> MadeAdapter:
        """The adapter of several adapters' states (MadeAdapter.state) added up."""
        return self._files(self._pipeline.compose([state_from_bytes(s) for s in states]))

    def _files(self, adapter: Adapter) -> MadeAdapter:
        peft_config = self._pipeline.peft_config()
        return MadeAdapter(adapter.peft_bytes(), peft_config, adapter.state_bytes(), adapter.tokens)


def load_maker(
    base_model: str | Path | None = None,
    generator_dir: Path | None = None,
    dtype: ReadingDType = "auto",
) -> AdapterMaker:
    """The base model, reading in `dtype`, and a generator (default: the shipped one) behind
    the narrow interface. A maker only reads (no gradients): its decoder's bfloat16 weights
    are packed for the CPU's matmuls."""
    pipeline = load_pipeline(base_model, generator_dir, reading_dtype(dtype))
    pipeline.pack_for_reading()
    return AdapterMaker(pipeline)


def load_served_model(
    base_model: str | Path | None = None, generator_dir: Path | None = None
) -> ServedModel:
    """The base model's tokenizer and folder and the generator's config, neither's weights."""
    name, path, tokenizer = load_tokenizer(base_model)
    return ServedModel(name, path, tokenizer, load_config(generator_dir or DEFAULT_GENERATOR_DIR))
