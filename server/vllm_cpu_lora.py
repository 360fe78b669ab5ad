"""vLLM 0.32's CPU LoRA ops and punica wrapper, replaced, run by vLLM as a plugin
(pyproject.toml's entry point) in each of its processes: on a CPU it spawns its engine and
worker, which a patch made in the server's process would not reach. Only vLLM imports it.

vLLM's CPU ops (`vllm/lora/ops/torch_ops`) give every row (token) its adapter by copying that
adapter's matrices for the row, then an einsum: a prefill of n tokens copies n matrices per layer
and op (2,048 tokens: 48 ms per layer, measured, where the base layer takes about 1). Here a
batch whose adapter rows share one slot runs plain matmuls with that slot's matrices; otherwise
a decode step's few rows each take their own slot's matrices (a batched matmul), and a prefill's
many rows run every slot in one matmul, a one-hot mask keeping each row's own. The slots'
matrices are kept per layer, rank first, until vLLM writes a slot. Each batch's routing is
worked out once, not in every layer, and a layer's LoRA is applied in one call
(GroupedPunicaWrapper). vLLM's ops also read a base-model row's index, -1, as the last adapter
slot: once every slot held an adapter, a base-model request batched with adapter requests was
answered with that adapter (vLLM's GPU kernels skip such rows; vllm-project/vllm#48421, open).
Here such rows get no adapter at all.
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

# Up to this many rows (a decode step), the LoRA math runs in float32, from matrices kept per
# layer (a tiny float32 matmul costs 3-6 us where a bfloat16 one costs 17, its oneDNN call), each
# row with its own slot's matrices: in a decode step of 30 layers that read the model's weights
# between them, every slot in one matmul added 6.9 / 7.5 ms to 8 rows on 8 adapters / 16 on 16,
# each row's own 4.4 / 4.1 ms (measured). More rows (a prefill, or one beside decode steps) run in
# the model's dtype (1,024 rows: 3x faster than float32).
FEW_ROWS = 16


class Routing:
    """Which adapter slot each row (token) of a batch uses, worked out once for all its layers.
    An index below 0 is a base-model row: it gets no adapter."""

    def __init__(self, indices: Tensor) -> None:
        base = indices < 0
        self.none = bool(base.all())  # no row has an adapter
        self.n = indices.shape[0]
        self.few = self.n <= FEW_ROWS
        used = indices[~base].unique()
        # The common batch: every adapter row uses one slot (every single request; one user's
        # questions about one document): plain matmuls with that slot's matrices.
        self.slot = int(used[0]) if used.numel() == 1 else None
        self.base = base.unsqueeze(-1) if bool(base.any()) else None
        self._slots = indices.clamp(min=0)  # each row's slot (a base row's result is zeroed)
        rows = (~base).nonzero().squeeze(-1)
        self._own = rows, indices[rows]  # each adapter row and its slot
        self._masks: dict[tuple[int, int, torch.dtype], Tensor] = {}

    def mask(self, slots: int, rank: int, dtype: torch.dtype) -> Tensor:
        """(n, slots x rank): 1 on each adapter row's own slot's `rank` columns, else 0 (a base
        row: all 0); made once per batch, for all its layers."""
        key = (slots, rank, dtype)
        if key not in self._masks:
            onehot = torch.zeros(self.n, slots, rank, dtype=dtype)
            onehot[self._own] = 1
            self._masks[key] = onehot.flatten(1)
        return self._masks[key]

    def shrink(self, x: Tensor, a: Tensor) -> Tensor:
        """Row t: A[slot of t] x[t] in float32 (as vLLM's), zero for base rows; (n, r)."""
        m = slot_matrices(a, torch.float32)
        x = x.float()
        if self.slot is not None:
            return self._masked(x @ m[self.slot].T)
        if self.few:
            return self._masked(torch.bmm(x.unsqueeze(1), self._each_rows(m).mT).squeeze(1))
        slots, r, _ = m.shape
        spread = (x @ m.flatten(0, 1).T).mul_(self.mask(slots, r, torch.float32))
        return spread.view(self.n, slots, r).sum(1)

    def expand(self, z: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
        """Row t: B[slot of t] z[t], (n, o), where `z` is a shrink's (zero for base rows): in
        float32 for a few rows, else in `dtype`."""
        dt = torch.float32 if self.few else dtype
        m = slot_matrices(b, dt)
        z = z.to(dt)
        if self.slot is not None:
            return z @ m[self.slot]
        if self.few:
            return torch.bmm(z.unsqueeze(1), self._each_rows(m)).squeeze(1)
        slots, r, _ = m.shape
        return z.repeat(1, slots).mul_(self.mask(slots, r, dt)) @ m.flatten(0, 1)

    def delta(self, x: Tensor, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
        """expand(shrink(x)): a few rows in float32, each with its own slot's matrices; more in
        `dtype`, one slot's matrices or every slot's with each row masked to its own, so no
        layer gathers the slots used (a layer's LoRA, 48 rows on 8 adapters: 123 -> 79 us;
        1,024 rows: 779 -> 341 us; 1,024 rows on one adapter: 230 -> 89 us, measured against a
        float32 shrink of the slots used)."""
        if self.few:
            return self.expand(self.shrink(x, a), b, dtype)
        ma, mb = slot_matrices(a, dtype), slot_matrices(b, dtype)
        x = x.to(dtype)
        if self.slot is not None:
            return self._masked(x @ ma[self.slot].T) @ mb[self.slot]
        slots, r, _ = ma.shape
        return (x @ ma.flatten(0, 1).T).mul_(self.mask(slots, r, dtype)) @ mb.flatten(0, 1)

    def _each_rows(self, m: Tensor) -> Tensor:
        """(n, r, d): each row's own slot's matrix of the kept (slots, r, d)."""
        return m.index_select(0, self._slots)

    def _masked(self, z: Tensor) -> Tensor:
        """A shrink with base rows zeroed: a delta is linear in it, so they get none."""
        return z if self.base is None else z.masked_fill(self.base, 0)


# A layer's slots in each dtype, kept while vLLM writes none of them: an in-place write (vLLM
# loading or clearing a slot) bumps the tensor's version, and they are made again.
_SLOT_MATRICES: dict[tuple[int, torch.dtype], tuple[weakref.ref[Tensor], int, Tensor]] = {}


def slot_matrices(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """vLLM's stacked (slots, 1, o, i) LoRA weights as (slots, r, d) in `dtype`, rank first:
    A (r, i) as it is, B (o, r) transposed."""
    key = (id(weights), dtype)
    kept = _SLOT_MATRICES.get(key)
    if kept is not None and kept[0]() is weights and kept[1] == weights._version:
        return kept[2]
    slots, (o, i) = weights.shape[0], weights.shape[-2:]
    w = weights.reshape(slots, o, i).to(dtype)
    m = (w if o <= i else w.transpose(1, 2)).contiguous()
    _SLOT_MATRICES[key] = (weakref.ref(weights), weights._version, m)
    return m


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
            delta = self.routing.delta(x, a, b, y.dtype)
            if scale != 1.0:  # ours fold their scaling into B: 1
                delta = delta * scale
            y[:, offset : offset + size] += delta
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
    outputs = Routing(lora_indices_tensor).shrink(inputs, lora_b_weights)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = Routing(lora_indices_tensor).expand(inputs, lora_b_weights, output_tensor.dtype)
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
    outputs = Routing(lora_indices_tensor).expand(inputs, lora_b_weights, output_tensor.dtype)
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
