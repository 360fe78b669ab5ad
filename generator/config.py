"""Generator configuration: the paper's names and defaults, scaled to the base model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from typing_extensions import Unpack

CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"

Normalization = Literal["svd", "frobenius"]


class ConfigOverrides(TypedDict, total=False):
    """GeneratorConfig fields that `for_base_model` scales or defaults, set by the caller."""

    layer_prefix: str
    inner_size: int
    rank: int
    alpha: float
    window: int
    windows_at_once: int
    normalization: Normalization
    rms_norm_eps: float


class GeneratorOptions(ConfigOverrides, total=False):
    """Everything `for_base_model` takes besides the model and its name."""

    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild a generator; saved next to its weights.

    Names follow the paper (docs/design.md): inner_size is d_r, rank is r, alpha scales by
    alpha / d_r, window is W. `modules` maps each target module name to its (in_features,
    out_features). `windows_at_once` is how a context is read: that many windows in one forward
    pass, each with the adapter of the windows read before that pass (1: each window with the
    adapter of all windows before it, as the paper reads and as training reads).
    """

    base_model: str
    hidden_size: int
    num_layers: int
    modules: dict[str, tuple[int, int]]
    layer_prefix: str = "model.layers"
    inner_size: int = 1024
    rank: int = 128
    alpha: float = 64.0
    window: int = 1024
    windows_at_once: int = 1
    normalization: Normalization = "svd"
    rms_norm_eps: float = 1e-6
    module_paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank > self.inner_size:
            raise ValueError(f"rank {self.rank} exceeds inner_size {self.inner_size}: lower rank")
        if self.normalization not in ("svd", "frobenius"):
            raise ValueError(
                f"normalization must be 'svd' or 'frobenius', not {self.normalization!r}"
            )
        if self.window < 1:
            raise ValueError(f"window must be positive, not {self.window}")
        if self.windows_at_once < 1:
            raise ValueError(f"windows_at_once must be positive, not {self.windows_at_once}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.inner_size

    @property
    def lora_rank(self) -> int:
        """Rank of the exported LoRA: r after SVD normalization, d_r after Frobenius."""
        return self.rank if self.normalization == "svd" else self.inner_size

    @classmethod
    def for_base_model(
        cls,
        model: PreTrainedModel,
        base_model: str,
        target_modules: tuple[str, ...] = ("o_proj",),
        **overrides: Unpack[ConfigOverrides],
    ) -> GeneratorConfig:
        """Scale the paper's sizes (d=4096: d_r=1024, r=128, alpha=64) to `model`'s hidden size."""
        cfg = model.config
        d: int = cfg.hidden_size
        inner = overrides.pop("inner_size", None) or 2 ** round(math.log2(d / 4))
        layer0 = model.model.layers[0]
        modules: dict[str, tuple[int, int]] = {}
        paths: dict[str, str] = {}
        for name, module in layer0.named_modules():
            name = name.removesuffix(".base_layer")  # already wrapped by generator.lora
            short = name.rsplit(".", 1)[-1]
            if short in target_modules and isinstance(module, nn.Linear):
                modules[short] = (module.in_features, module.out_features)
                paths[short] = name
        missing = set(target_modules) - set(modules)
        if missing:
            raise ValueError(f"target modules {sorted(missing)} not found in {base_model}'s layers")
        defaults: ConfigOverrides = {
            "inner_size": inner,
            "rank": min(max(inner // 8, 8), 256),
            "alpha": inner / 16,
            "rms_norm_eps": getattr(cfg, "rms_norm_eps", 1e-6),
        }
        defaults.update(overrides)
        return cls(
            base_model=base_model,
            hidden_size=d,
            num_layers=cfg.num_hidden_layers,
            modules=modules,
            module_paths=paths,
            **defaults,
        )

    def module_names(self) -> list[str]:
        """Full module names in the base model, e.g. model.layers.3.self_attn.o_proj."""
        return [
            f"{self.layer_prefix}.{layer}.{self.module_paths[m]}"
            for layer in range(self.num_layers)
            for m in self.modules
        ]

    def save(self, folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> GeneratorConfig:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        raw["modules"] = {k: tuple(v) for k, v in raw["modules"].items()}
        return cls(**raw)
