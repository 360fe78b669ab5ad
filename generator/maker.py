"""The generator as the server uses it: text and token ids in, an adapter's files out.

This is the one interface between serving and the torch code; no tensor crosses it. What it
returns is everything a stored adapter needs, together: the PEFT weights and config that vLLM
loads, and the raw state that extending the adapter later continues from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from generator.base_model import BaseModelError, cache_root
from generator.lora import write_peft_folder
from generator.pipeline import (
    Adapter,
    AdapterPipeline,
    EmptyContextError,
    GeneratorError,
    Reading,
    adapter_id,
    composed_id,
    load_pipeline,
    state_from_bytes,
)

__all__ = [
    "AdapterMaker",
    "BaseModelError",
    "EmptyContextError",
    "GeneratorError",
    "MadeAdapter",
    "Reading",
    "cache_root",
    "load_maker",
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


class AdapterMaker:
    """Tokenizes like the base model, and turns token ids into a MadeAdapter."""

    def __init__(self, pipeline: AdapterPipeline) -> None:
        self._pipeline = pipeline
        self.base_model = pipeline.base.name  # what users and the engine call it
        self.base_model_path = pipeline.base.path  # the Hugging Face folder the engine serves
        self.fingerprint = pipeline.fingerprint  # generator + base model: part of adapter ids
        self.lora_rank = pipeline.config.lora_rank
        self.target_modules = sorted(pipeline.config.modules)  # what its adapters change
        vocab = pipeline.base.tokenizer.get_vocab()
        # No token covers more characters than its own string has: a text of n characters has
        # at least n / max_token_chars tokens, which bounds a context's size before tokenizing.
        self.max_token_chars = max(len(token) for token in vocab)

    def tokenize(self, text: str) -> list[int]:
        return self._pipeline.tokenize(text)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Messages in the base model's chat template."""
        text = self._pipeline.base.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return cast(str, text)  # tokenize=False: the rendered text (typed as any of its results)

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

    def finish(self, reading: Reading) -> MadeAdapter:
        return self._files(reading.adapter())

    def compose(self, states: list[bytes]) -> MadeAdapter:
        """The adapter of several adapters' states (MadeAdapter.state) added up."""
        return self._files(self._pipeline.compose([state_from_bytes(s) for s in states]))

    def _files(self, adapter: Adapter) -> MadeAdapter:
        peft_config = self._pipeline.peft_config()
        return MadeAdapter(adapter.peft_bytes(), peft_config, adapter.state_bytes(), adapter.tokens)


def load_maker(
    base_model: str | Path | None = None, generator_dir: Path | None = None
) -> AdapterMaker:
    """The base model and a generator (default: the shipped one) behind the narrow interface."""
    return AdapterMaker(load_pipeline(base_model, generator_dir))
