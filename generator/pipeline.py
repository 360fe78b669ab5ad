"""Context -> adapter: the frozen base model reads the context window by window, the generator
turns what it read into a LoRA. Also saving and loading generators, and adapter ids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from generator.base_model import (
    BaseModel,
    hook_layer_inputs,
    layer_inputs,
    load_base_model,
    pack_linears,
    tokenize,
)
from generator.config import WEIGHTS_FILE, GeneratorConfig, GeneratorOptions
from generator.lora import applied, attach_lora_layers, peft_bytes, peft_config
from generator.model import AdapterGenerator, LoRAFactors, State, add_states

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

TOKENS_KEY = "__tokens__"
DEFAULT_GENERATOR_DIR = Path(__file__).parent / "weights" / "smollm2-135m-instruct"


class GeneratorError(ValueError):
    """A generator folder is missing, unreadable or does not fit the base model."""


class EmptyContextError(ValueError):
    """The context has no tokens: there is nothing to adapt to."""


@dataclass
class Adapter:
    """A generated adapter: its LoRA factors and the raw state S that can be extended later."""

    state: State  # module name -> S (1, d_r, d_r)
    tokens: int  # context tokens read so far, all windows together
    factors: LoRAFactors = field(repr=False)

    def peft_bytes(self) -> bytes:
        return peft_bytes(self.factors)

    def state_bytes(self) -> bytes:
        tensors = {k: v.contiguous() for k, v in self.state.items()}
        return save({**tensors, TOKENS_KEY: torch.tensor([self.tokens])})


@dataclass
class Reading:
    """A context being read by `AdapterPipeline.read_next`, a window at a time."""

    ids: list[int]
    state: State | None  # raw S of what is read so far (a parent's included)
    tokens: int  # tokens read before `ids` (a parent's)
    factors: LoRAFactors | None = field(default=None, repr=False)  # LoRA of `state`
    read: int = 0  # tokens of `ids` read so far

    @property
    def done(self) -> bool:
        return self.read >= len(self.ids)

    def adapter(self) -> Adapter:
        assert self.done and self.state is not None and self.factors is not None
        return Adapter(state=self.state, tokens=self.tokens + len(self.ids), factors=self.factors)


def _stacked(factors: list[LoRAFactors | None]) -> LoRAFactors | None:
    """One batch of per-sample factors; a sample with none yet (its first window) gets zeros,
    exactly the base model. Samples that all share one adapter get it unbatched (broadcast)."""
    known = [f for f in factors if f is not None]
    if all(f is factors[0] for f in factors) or not known:
        return factors[0]
    stacked: LoRAFactors = {}
    for name, (a, b) in known[0].items():
        stacked[name] = (
            torch.cat([f[name][0] if f else torch.zeros_like(a) for f in factors]),
            torch.cat([f[name][1] if f else torch.zeros_like(b) for f in factors]),
        )
    return stacked


def save_generator(generator: AdapterGenerator, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator.config.save(folder)
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, folder / WEIGHTS_FILE)


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, TypeError) as e:
        raise GeneratorError(f"generator folder {folder}: cannot read it ({e})") from e


def load_config(folder: Path) -> GeneratorConfig:
    with reading(folder):
        return GeneratorConfig.load(folder)


def load_generator(folder: Path) -> AdapterGenerator:
    config = load_config(folder)
    with reading(folder):
        weights = load_file(folder / WEIGHTS_FILE)
    generator = AdapterGenerator(config)
    generator.load_state_dict(weights)
    return generator


def check_fits(config: GeneratorConfig, base: BaseModel) -> None:
    cfg = base.model.config
    if (config.hidden_size, config.num_layers) != (cfg.hidden_size, cfg.num_hidden_layers):
        raise GeneratorError(
            f"generator was built for {config.base_model} (d={config.hidden_size}, "
            f"{config.num_layers} layers), not {base.name} (d={cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers)"
        )


def fingerprint(generator: AdapterGenerator, base_name: str, dtype: torch.dtype) -> str:
    """Identifies (generator weights, config, base model and the dtype it reads in): part of
    every adapter id."""
    h = hashlib.sha256(f"{base_name}\0{dtype}".encode())
    h.update(json.dumps(generator.config.__dict__, sort_keys=True, default=str).encode())
    for name, tensor in sorted(generator.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_id(fingerprint: str, context: str, parent: str | None = None, tenant: str = "") -> str:
    """Content address of an adapter: same generator, base, parent, context and tenant -> same
    id."""
    return _content_id(tenant, f"{fingerprint}\0{parent or ''}\0{context}")


def composed_id(fingerprint: str, adapter_ids: list[str], tenant: str = "") -> str:
    """Content address of a composition: the same adapters in any order -> the same id."""
    return _content_id(tenant, f"{fingerprint}\0compose\0{chr(0).join(sorted(adapter_ids))}")


def _content_id(tenant: str, content: str) -> str:
    """`ga-` and a SHA-256 of `content`, scoped to `tenant`: another tenant's equal content gets
    another id (no tenant: the id as it always was)."""
    owner = f"tenant={tenant}\0" if tenant else ""
    return "ga-" + hashlib.sha256((owner + content).encode()).hexdigest()[:32]


def state_from_bytes(data: bytes) -> tuple[State, int]:
    """Inverse of Adapter.state_bytes: the raw S and the token count."""
    state = load(data)
    return state, int(state.pop(TOKENS_KEY).item())


class AdapterPipeline:
    """Base model + generator; makes and extends adapters. The base model stays frozen."""

    def __init__(self, base: BaseModel, generator: AdapterGenerator) -> None:
        check_fits(generator.config, base)
        self.base = base
        self.generator = generator
        self.config = generator.config
        attach_lora_layers(base.model, self.config.module_names())
        hook_layer_inputs(base.model.get_decoder())
        self.fingerprint = fingerprint(generator, base.name, base.model.dtype)

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.base.tokenizer, text)

    def pack_for_reading(self) -> None:
        """The decoder's bfloat16 weights packed for the CPU's matmuls (`pack_linears`), for a
        pipeline that only reads, as the server's does: training through it gets no gradient."""
        pack_linears(self.base.model.get_decoder())

    def read_window(
        self, ids: Tensor, mask: Tensor | None, factors: LoRAFactors | None, logits: bool = False
    ) -> tuple[State, Tensor | None]:
        """S of one window (b, W), read by the base model with `factors` applied, and its logits
        when `logits` (training's completion loss). `mask` (b, W) marks real tokens; padding is
        on the right, where causal attention already hides it from every real token, so only S
        needs the mask (the model's masked attention path was 4% slower, measured). Reading
        alone runs the decoder up to its last layer's input (`layer_inputs`), without the
        lm_head: S needs none of it, and in bfloat16 on a CPU the lm_head's tied weight is
        copied on every call (a third of a window's time, measured)."""
        with applied(factors):
            if logits:
                out = self.base.model(input_ids=ids, output_hidden_states=True, use_cache=False)
                # hidden_states[l] is the input of decoder layer l; the last is the final norm's.
                inputs, scores = out.hidden_states[:-1], out.logits
            else:
                inputs, scores = layer_inputs(self.base.model.get_decoder(), ids), None
        return self.generator.state(inputs, mask), scores

    def start_reading(self, ids: list[int], state: State | None = None, tokens: int = 0) -> Reading:
        """A context to read window by window (`read_next`); `state` and `tokens` continue an
        adapter (its raw S and token count): extending reads only the new tokens."""
        if not ids:
            raise EmptyContextError("context is empty: it has no tokens to adapt to")
        factors = None if state is None else self.generator.lora(state)
        return Reading(ids, state, tokens, factors)

    def pass_tokens(self, reading: Reading) -> int:
        """Tokens `read_next` reads of `reading` in its next pass."""
        return min(
            len(reading.ids) - reading.read, self.config.window * self.config.windows_at_once
        )

    @torch.no_grad()
    def read_next(self, readings: list[Reading]) -> None:
        """The next `windows_at_once` windows of each unfinished reading, read in one batch, each
        with the adapter of everything its reading read before. Contexts of any length share a
        batch: one that ends leaves it, another can join at the next call (continuous
        batching)."""
        w = self.config.window
        chunks = [r.ids[r.read : r.read + self.pass_tokens(r)] for r in readings]
        counts = [math.ceil(len(c) / w) for c in chunks]  # windows of each reading
        windows = [c[j : j + w] for c in chunks for j in range(0, len(c), w)]
        longest = max(map(len, windows))
        ids = torch.tensor([x + [0] * (longest - len(x)) for x in windows])
        mask = None
        if any(len(x) < longest for x in windows):  # right padding, masked out of S
            mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in windows])
            mask = mask.to(self.base.model.device)
        factors = _stacked(
            [r.factors for r, n in zip(readings, counts, strict=True) for _ in range(n)]
        )
        state = self.read_window(ids.to(self.base.model.device), mask, factors)[0]
        parts = {k: v.split(counts) for k, v in state.items()}
        states = []
        for i, (reading, chunk) in enumerate(zip(readings, chunks, strict=True)):
            read = {k: p[i].sum(0, keepdim=True) for k, p in parts.items()}
            reading.state = add_states(reading.state, read)
            reading.read += len(chunk)
            states.append(reading.state)
        # Every reading's LoRA in one batch (alone, its SVDs and folds took 18 ms of a 285-token
        # adapt's 300, measured); each reading's factors are what it would get alone.
        factors = self.generator.lora({k: torch.cat([s[k] for s in states]) for k in states[0]})
        for i, reading in enumerate(readings):
            reading.factors = {k: (a[i : i + 1], b[i : i + 1]) for k, (a, b) in factors.items()}

    def adapt_ids(self, ids: list[int], state: State | None = None, tokens: int = 0) -> Adapter:
        """Read `ids` a pass at a time (`read_next`), each with the adapter of everything before
        it applied."""
        reading = self.start_reading(ids, state, tokens)
        while not reading.done:
            self.read_next([reading])
        return reading.adapter()

    @torch.no_grad()
    def compose(self, parts: list[tuple[State, int]]) -> Adapter:
        """One adapter from several adapters' raw states and token counts: their contexts add
        up as the windows of one context do, and no text is read again."""
        state = None
        for part, _ in parts:
            state = add_states(state, part)
        assert state is not None, "nothing to compose"
        tokens = sum(n for _, n in parts)
        return Adapter(state=state, tokens=tokens, factors=self.generator.lora(state))

    def adapt(self, text: str) -> Adapter:
        return self.adapt_ids(self.tokenize(text))

    def peft_config(self) -> str:
        return peft_config(self.config, str(self.base.path))


def new_generator(
    base: BaseModel, seed: int = 0, **overrides: Unpack[GeneratorOptions]
) -> AdapterGenerator:
    """An untrained generator sized for `base` (its adapters are exactly zero)."""
    torch.manual_seed(seed)
    return AdapterGenerator(GeneratorConfig.for_base_model(base.model, base.name, **overrides))


def load_pipeline(
    base_model: str | Path | None = None,
    generator_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> AdapterPipeline:
    """The base model (in `dtype`) plus a generator: `generator_dir`, else the shipped default.

    Without a trained generator the adapters are exactly zero (B starts at zero), so that case
    is logged loudly rather than hidden.
    """
    base = load_base_model(base_model, dtype)
    folder = generator_dir or DEFAULT_GENERATOR_DIR
    if generator_dir is not None or (folder / WEIGHTS_FILE).is_file():
        return AdapterPipeline(base, load_generator(folder))
    log.warning("no trained generator at %s: using an untrained one (zero adapters)", folder)
    return AdapterPipeline(base, new_generator(base))
