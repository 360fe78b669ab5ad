"""vLLM's environment, set before vllm is imported: its CPU backend's settings (on a machine
without a GPU) and its cache under ours. What the environment already sets wins."""

from __future__ import annotations

import os

from generator.maker import cache_root

CPU_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # measured faster on a 2-core machine
}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_dtype(dtype: str) -> str:
    """`auto`: bfloat16 on a GPU; float32 on a CPU, where bf16 matmuls are slow without the
    matrix units most CPUs lack."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_gpu() else "float32"


def apply_vllm_env(kv_cache_gib: float) -> None:
    """Fill in vLLM's defaults for this machine and keep its cache beside ours."""
    if not has_gpu():
        # vLLM's default CPU KV cache fails to start on a machine with 24 GiB of memory
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
        for key, value in CPU_DEFAULTS.items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
