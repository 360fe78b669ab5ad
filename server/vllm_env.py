"""vLLM's environment for these CPU machines (DESIGN.md section 3); set before importing vllm."""

from __future__ import annotations

import os
from pathlib import Path

from generator.base_model import cache_root

CPU_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB; vLLM's default fails to start on 24 GiB machines
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # faster on 2 cores
}


def apply_vllm_env() -> None:
    """Fill in vLLM's CPU defaults and keep its cache out of the home folder; never override."""
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(cache_root()) / "vllm"))
