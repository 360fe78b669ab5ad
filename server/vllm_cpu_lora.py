"""vLLM 0.32's CPU LoRA ops and punica wrapper, replaced, run by vLLM as a plugin
(pyproject.toml's entry point) in each of its processes: on a CPU it spawns its engine and
worker, which a patch made in the server's process would not reach. Only vLLM imports it.

vLLM's CPU ops (`vllm/lora/ops/torch_ops`) give every row (token) its adapter by copying that
adapter's matrices for the row, then an einsum: a prefill of n tokens copies n matrices per layer
and op (2,048 tokens: 48 ms per layer, measured, where the base layer takes about 1). Here a
batch whose adapter rows share one slot runs one plain matmul; a batch of more than FEW_ROWS
rows runs one matmul over the adapters it uses (at most `max_loras`) and keeps each row's own
block; a decode step's few rows run every slot on every row, from one matrix per layer kept
until vLLM writes a slot. Each batch's routing is worked out once, not in every layer, and a
layer's LoRA is applied in one call (GroupedPunicaWrapper). vLLM's ops also read a base-model
row's index, -1, as the last adapter slot: once every slot held an adapter, a base-model request
batched with adapter requests was answered with that adapter (vLLM's GPU kernels skip such rows;
vllm-project/vllm#48421, open). Here such rows get no adapter at all.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

# Up to this many rows, every slot on every row beats gathering the slots used (16 rows of 16
# adapters: 115 vs 314 us a layer; 64 rows of 2: 202 vs 158, measured).
FEW_ROWS = 16


class Routing:
    """Which adapter slot each row (token) of a batch uses, worked out once for all its layers.
    An index below 0 is a base-model row: it gets no adapter."""

    def __init__(self, indices: Tensor) -> None:
        base = indices < 0
        self.none = bool(base.all())  # no row has an adapter
        self.base = base.unsqueeze(-1) if bool(base.any()) else None
        self.indices = indices.clamp(min=0)
        self.n = indices.shape[0]
        # The common batch: every adapter row uses one slot. A plain matmul with that slot's
        # matrices then serves every row (a single-request decode step: LoRA took 8 ms of its
        # 56, half of it copying and einsum, measured).
        slots = indices[~base].unique()
        self.slot = int(slots[0]) if slots.numel() == 1 else None
        self.row = torch.arange(self.n)
        if self.n > FEW_ROWS and self.slot is None:
            self.used, slot_of_row = torch.unique(self.indices, return_inverse=True)
            self.block = slot_of_row.view(self.n, 1, 1)

    def rows(self, inputs: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
        """Row t: weights[slot of t] @ inputs[t] in `dtype`, zero for base rows.

        weights: (slots, o, i), or vLLM's stacked (slots, 1, o, i); inputs (n, i) -> (n, o)."""
        x = inputs.to(dtype)
        if self.base is not None:  # a delta is linear in its input: a zero row gets none
            x = x.masked_fill(self.base, 0)
        slots, (o, i) = weights.shape[0], weights.shape[-2:]
        if self.slot is not None or self.n <= FEW_ROWS:
            m = slot_matrix(weights, dtype)
            if self.slot is not None:
                s = self.slot
                return x @ m[s * o : (s + 1) * o].T if o <= i else x @ m[s * i : (s + 1) * i]
            if o <= i:  # shrink: every slot on every row (a few rows), then each row's own
                return (x @ m.T).view(self.n, slots, o)[self.row, self.indices]
            spread = x.new_zeros(self.n, slots, i)  # expand: each row's input in its slot's block
            spread[self.row, self.indices] = x
            return spread.view(self.n, slots * i) @ m
        n = self.n
        w = weights.reshape(slots, o, i)[self.used].to(dtype)  # (k, o, i): the adapters used
        k = self.used.numel()
        if o <= i:  # shrink: every used adapter on every row, then each row's own block
            every = (x @ w.reshape(k * o, i).T).view(n, k, o)
            return every.gather(1, self.block.expand(n, 1, o)).squeeze(1)
        # expand: each row's input in its adapter's block, zeros elsewhere, times all adapters
        spread = x.new_zeros(n, k, i).scatter_(1, self.block.expand(n, 1, i), x.unsqueeze(1))
        return spread.view(n, k * i) @ w.transpose(1, 2).reshape(k * i, o)


# A layer's slots as one matrix per dtype, kept while vLLM writes none of them: an in-place write
# (vLLM loading or clearing a slot) bumps the tensor's version, and the matrix is made again.
_SLOT_MATRICES: dict[tuple[int, torch.dtype], tuple[weakref.ref[Tensor], int, Tensor]] = {}


def slot_matrix(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Every slot's (o, i) matrix of `weights` in `dtype`: stacked as (slots * o, i) for a
    shrink (o <= i), as (slots * i, o), transposed, for an expand."""
    key = (id(weights), dtype)
    kept = _SLOT_MATRICES.get(key)
    if kept is not None and kept[0]() is weights and kept[1] == weights._version:
        return kept[2]
    slots, (o, i) = weights.shape[0], weights.shape[-2:]
    w = weights.reshape(slots, o, i).to(dtype)
    m = w.reshape(slots * o, i) if o <= i else w.transpose(1, 2).reshape(slots * i, o)
    _SLOT_MATRICES[key] = (weakref.ref(weights), weights._version, m.contiguous())
    return _SLOT_MATRICES[key][2]


def lora_rows(inputs: Tensor, weights: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
    return Routing(indices).rows(inputs, weights, dtype)


class GroupedPunicaWrapper(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper, each batch's routing worked out once (`update_metadata`) and a
    linear layer's LoRA applied in one call: vLLM's chain of calls per layer (shrink, expand,
    each through its prefill or decode op) cost a decode step more than the LoRA math."""

    routing: Routing

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self.routing = Routing(self.token_lora_indices)

    def add_lora_linear(
        self,
        y: Tensor,
        x: Tensor,
        lora_a_stacked: tuple[Tensor, ...],
        lora_b_stacked: tuple[Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """y[:, slice] += scale x A^T B^T per row's adapter; the middle in float32, as vLLM's."""
        if self.routing.none:
            return
        x = x.view(-1, x.shape[-1])
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            shrunk = self.routing.rows(x, a, torch.float32)
            if scale != 1.0:  # ours fold their scaling into B: 1
                shrunk = shrunk * scale
            y[:, offset : offset + size] += self.routing.rows(shrunk, b, y.dtype)
            offset += size


# The three ops vLLM's CPU punica wrapper calls; its sgmv_* (prefill) ops call these by name.
# Signatures and output writes as vLLM's own.


def bgmv_shrink(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # the adapter and the model may pad their outputs differently
    common = min(outputs.shape[1], output_tensor.shape[1])
    _write(output_tensor[:, :common], outputs[:limit, :common], add_inputs)


def bgmv_expand_slice(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _write(output_tensor[:, slice_offset : slice_offset + slice_size], outputs, add_inputs)


def _write(target: Tensor, values: Tensor, add: bool) -> None:
    """An expand op's output into its place in the layer's (a view): added, or set."""
    if add:
        target += values
    else:
        target.copy_(values)


OPS: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


class VllmLoRAOpsChanged(RuntimeError):
    """The pinned vLLM's CPU LoRA ops no longer take what ours take: this module needs a look."""


@functools.cache
def use_our_cpu_lora_ops() -> None:
    """Ours wherever vLLM's CPU LoRA layers look the ops and the punica wrapper up; fails loudly
    (the engine does not start) where vLLM's take other arguments than ours."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    theirs = {name: getattr(lora_ops, name) for name in OPS}
    theirs["add_lora_linear"] = PunicaWrapperCPU.add_lora_linear
    ours = {**OPS, "add_lora_linear": GroupedPunicaWrapper.add_lora_linear}
    for name, op in ours.items():
        if list(inspect.signature(theirs[name]).parameters) != list(
            inspect.signature(op).parameters
        ):
            raise VllmLoRAOpsChanged(
                f"vLLM's {name}{inspect.signature(theirs[name])} is not the one "
                "server/vllm_cpu_lora.py replaces: update that module for this vLLM"
            )
    for name, op in OPS.items():
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, op)
    wrapper = f"{GroupedPunicaWrapper.__module__}.{GroupedPunicaWrapper.__qualname__}"
    # the platform names the wrapper class vLLM builds for every LoRA model (punica_selector)
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: wrapper)  # type: ignore[method-assign, assignment]
