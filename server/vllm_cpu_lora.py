"""A fix of vLLM 0.32's CPU LoRA ops, run by vLLM as a plugin (pyproject.toml's entry point) in
each of its processes: on a CPU it spawns its engine and worker, which a patch made in the
server's process would not reach. A module of its own, light to import there."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

LoRAOp = Callable[..., None]  # (inputs, weights, output, lora index per row, *options)


def no_lora_for_base_rows(op: LoRAOp) -> LoRAOp:
    """`op`, giving rows whose LoRA index is -1 (base-model tokens) no adapter at all.

    vLLM 0.32's CPU LoRA ops index the adapter slots with a row's index, so -1 is the last slot:
    once every slot held an adapter, a base-model request batched with adapter requests was
    answered with that adapter (vLLM's GPU kernels skip such rows; vllm-project/vllm#48421,
    open). An adapter's delta is linear in its input: zero rows in, zero delta out.
    """

    @functools.wraps(op)
    def op_(
        inputs: Any, weights: Any, output: Any, indices: Any, *options: Any, **named: Any
    ) -> None:
        base = (indices < 0).unsqueeze(-1)
        op(inputs.masked_fill(base, 0), weights, output, indices.clamp(min=0), *options, **named)

    return op_


@functools.cache
def skip_base_rows_in_cpu_lora_ops() -> None:
    """The fix above, wherever vLLM's CPU LoRA layers look the ops up."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = no_lora_for_base_rows(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, fixed)
