"""vLLM's environment, set before vllm is imported: its CPU backend's settings (on a machine
without a GPU) and its cache under ours. What the environment already sets wins."""

from __future__ import annotations

import os
from typing import Literal

from generator.maker import cache_root, native_bfloat16

CPU_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # measured faster on a 2-core machine
}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# The dtypes vLLM's engine takes by name (its ModelDType, less "auto", which we resolve).
EngineDType = Literal["half", "float16", "bfloat16", "float", "float32"]


def engine_dtype(dtype: str) -> EngineDType:
    """`auto`: bfloat16 on a GPU and on a CPU that computes it natively (AMX here: prefill 2.5x
    and decode 1.7x as fast as float32, measured), else float32. Another name passes if vLLM
    takes it."""
    match dtype:
        case "auto":
            return "bfloat16" if has_gpu() or native_bfloat16() else "float32"
        case "half" | "float16" | "bfloat16" | "float" | "float32":
            return dtype
    raise ValueError(f"Unknown dtype: {dtype!r}")


def apply_vllm_env(kv_cache_gib: int) -> None:
    """Fill in vLLM's defaults for this machine and keep its cache beside ours."""
    if not has_gpu():
        # vLLM's default CPU KV cache fails to start on a machine with 24 GiB of memory
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        for key, value in CPU_DEFAULTS.items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
