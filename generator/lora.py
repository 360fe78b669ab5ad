"""Generated LoRA: applied to the base model (as PEFT does) and exported in PEFT's format.

The exported folder is what PEFT (evaluation) and vLLM (serving) read, so both run exactly the
adapter the generator produced.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from safetensors.torch import save
from torch import Tensor, nn

from generator.config import GeneratorConfig
from generator.model import LoRAFactors

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


# The factors of the current forward call, per thread and per asyncio task: the layers hold no
# adapter, so concurrent calls with different adapters share one base model safely.
_FACTORS: ContextVar[LoRAFactors | None] = ContextVar("generated_lora_factors", default=None)


class LoRALinear(nn.Module):
    """Wraps a base nn.Linear; adds x A^T B^T with the factors `applied` to the current call
    (per-sample when they have a batch dimension)."""

    def __init__(self, base_layer: nn.Linear, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name  # key of this layer in the factors

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        factors = _FACTORS.get()
        if factors is None:
            return y
        a, b = factors[self.name]  # A (b, r, d_in), B (b, d_out, r), or one of each unbatched
        return y + (x @ a.to(x.dtype).mT) @ b.to(x.dtype).mT


def attach_lora_layers(model: nn.Module, names: list[str]) -> None:
    """Replace each named nn.Linear of `model` with a LoRALinear around it (idempotent)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child), LoRALinear):
            setattr(parent, child, LoRALinear(getattr(parent, child), name))


@contextlib.contextmanager
def applied(factors: LoRAFactors | None) -> Iterator[None]:
    """Forward calls inside run with `factors` (module name -> A, B); None: the base model."""
    token = _FACTORS.set(factors)
    try:
        yield
    finally:
        _FACTORS.reset(token)


def peft_config(config: GeneratorConfig, base_model_path: str) -> str:
    """adapter_config.json; the alpha/d_r scaling is folded into lora_B, so lora_alpha = r."""
    r = config.lora_rank
    return json.dumps(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": r,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted(config.modules),
            "base_model_name_or_path": base_model_path,
            "fan_in_fan_out": False,
            "inference_mode": True,
        },
        indent=2,
    )


def peft_tensors(factors: LoRAFactors) -> dict[str, Tensor]:
    """PEFT key names for one (unbatched) adapter, float32 contiguous."""
    out: dict[str, Tensor] = {}
    for name, (a, b) in factors.items():
        out[f"base_model.model.{name}.lora_A.weight"] = a.squeeze(0).float().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = b.squeeze(0).float().contiguous()
    return out


def peft_bytes(factors: LoRAFactors) -> bytes:
    """adapter_model.safetensors as bytes (what the server stores)."""
    return save(peft_tensors(factors))


def write_peft_folder(folder: Path, weights: bytes, config: str) -> Path:
    """Write a PEFT adapter folder atomically: a crash leaves either nothing or the whole folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / PEFT_WEIGHTS_FILE).write_bytes(weights)
        (tmp / PEFT_CONFIG_FILE).write_text(config)
        if folder.exists():
            _remove_folder(folder)
        os.replace(tmp, folder)
    except BaseException:
        _remove_folder(tmp)
        raise
    return folder


def _remove_folder(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
