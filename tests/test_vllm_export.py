"""What `genadapter adapt` writes, vLLM serves: greedy outputs equal PEFT's, token for token."""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import cast

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from genadapter.cli import main
from generator.base_model import BaseModel, native_bfloat16
from generator.pipeline import save_generator
from server.settings import Settings
from server.vllm_cpu_lora import (
    FEW_ROWS,
    GroupedPunicaWrapper,
    Routing,
    VllmLoRAOpsChanged,
    use_our_cpu_lora_ops,
)
from server.vllm_cpu_queues import SPIN_S, VllmQueuesChanged, spin_briefly
from server.vllm_env import apply_vllm_env, engine_dtype
from tests.conftest import random_generator

QUESTIONS = ["What is the capital of Zorblat?", "Tell me about purple oceans."]
CONTEXT = (
    "Zorblat is a small fictional planet orbiting the star Quenmar. Its capital city is Velloran, "
    "founded in the year 2207 by explorers from Earth. The planet is famous for its purple oceans."
)


def peft_greedy(base: BaseModel, adapter: Path, prompts: list[str], n: int) -> list[list[int]]:
    base_model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base_model, adapter).eval()
    outs = []
    for p in prompts:
        ids = base.tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs


@pytest.mark.slow
def test_cli_adapter_is_served_by_vllm_like_peft(smollm2: BaseModel, tmp_path: Path) -> None:
    save_generator(random_generator(smollm2, std=0.3), tmp_path / "generator")
    (tmp_path / "context.txt").write_text(CONTEXT)
    adapter = tmp_path / "adapter"
    assert (
        main(
            [
                "adapt",
                str(tmp_path / "context.txt"),
                "--out",
                str(adapter),
                "--generator",
                str(tmp_path / "generator"),
            ]
        )
        == 0
    )

    apply_vllm_env(Settings().kv_cache_gib)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts = [
        cast(  # tokenize=False: the rendered text (typed as any of its results)
            str,
            smollm2.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
        )
        for q in QUESTIONS
    ]
    llm = LLM(
        model=str(smollm2.path),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=2,
        dtype="float32",
        max_model_len=1024,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=20)
    served = llm.generate(prompts, params, lora_request=LoRARequest("a", 1, str(adapter)))
    base = llm.generate(prompts, params)
    del llm

    served_ids = [list(o.outputs[0].token_ids) for o in served]
    assert served_ids != [list(o.outputs[0].token_ids) for o in base]  # the adapter matters
    assert served_ids == peft_greedy(smollm2, adapter, prompts, 20)


@pytest.mark.parametrize("repeat", [1, FEW_ROWS])  # a decode step's few rows; a prefill's
def test_our_cpu_lora_ops_give_each_row_its_adapter_and_base_rows_none(repeat: int) -> None:
    """vLLM's CPU LoRA ops read a base-model row's index, -1, as the last adapter slot; ours give
    such a row no delta, and each adapter row its own, decoding and prefilling, whether each row
    takes its own slot's matrices (few rows) or every slot is computed under a mask (many)."""
    use_our_cpu_lora_ops()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    torch.manual_seed(0)
    rows = torch.tensor([-1, 0, 1] * repeat)  # base, slot 0, slot 1 (the last)
    x, n = torch.randn(len(rows), 8), len(rows)
    a, b = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 8, 4)  # two slots of rank 4
    by_hand = torch.stack(
        [torch.zeros(8) if s < 0 else b[s, 0] @ (a[s, 0] @ x[i]) for i, s in enumerate(rows)]
    )
    shrunk, prefilled = torch.zeros(n, 4), torch.zeros(n, 4)
    punica_cpu.bgmv_shrink(x, a, shrunk, rows, 1.0)
    ones = torch.ones(n)  # one token per request
    lora_ops.sgmv_shrink(x, a, prefilled, ones.cumsum(0) - 1, ones.long(), rows, n, 1, n, 1.0)
    torch.testing.assert_close(prefilled, shrunk)
    out, sliced = torch.ones(n, 8), torch.ones(n, 16)
    punica_cpu.bgmv_expand(shrunk, b, out, rows, True)
    punica_cpu.bgmv_expand_slice(shrunk, b, sliced, rows, 8, 8, True)
    torch.testing.assert_close(out - 1, by_hand)
    torch.testing.assert_close(sliced[:, 8:], out)
    by_name = torch.ones(n, 8)
    punica_cpu.bgmv_expand(shrunk, b, by_name, rows, add_inputs=True)  # as the logits layer calls
    torch.testing.assert_close(by_name, out)
    a[1] += 1  # vLLM loads another adapter into slot 1, in place: the kept matrices follow
    again = torch.zeros(n, 4)
    punica_cpu.bgmv_shrink(x, a, again, rows, 1.0)
    torch.testing.assert_close(again[rows == 1], x[rows == 1] @ a[1, 0].T)
    one_adapter = torch.zeros(n, 4)  # a batch of one adapter: one plain matmul
    punica_cpu.bgmv_shrink(x, a, one_adapter, torch.ones(n, dtype=torch.long), 1.0)
    torch.testing.assert_close(one_adapter, x @ a[1, 0].T)
    with_base = torch.zeros(n, 4)  # one adapter and base rows: those still get none
    slot_0 = rows.clamp(max=0)
    punica_cpu.bgmv_shrink(x, a, with_base, slot_0, 1.0)
    torch.testing.assert_close(with_base, (slot_0 == 0).unsqueeze(-1) * (x @ a[0, 0].T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the engine's
@pytest.mark.parametrize("repeat", [1, FEW_ROWS])
def test_our_punica_wrapper_adds_each_rows_adapter_once_per_layer(
    repeat: int, dtype: torch.dtype
) -> None:
    use_our_cpu_lora_ops()
    from vllm.platforms import current_platform

    assert current_platform.get_punica_wrapper().endswith("vllm_cpu_lora.GroupedPunicaWrapper")
    torch.manual_seed(0)
    rows = torch.tensor([-1, 0, 1] * repeat)
    x, n = torch.randn(len(rows), 8), len(rows)
    a, b = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 6, 4)  # two slices: outputs 6 and 6
    x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)  # the engine's; by hand in float32
    xf, af, bf = x.float(), a.float(), b.float()
    by_hand = torch.stack(
        [
            torch.zeros(6) if s < 0 else 0.5 * bf[s, 0] @ (af[s, 0] @ xf[i])
            for i, s in enumerate(rows)
        ]
    )
    wrapper = GroupedPunicaWrapper(64, 8, "cpu")
    wrapper.routing = Routing(rows)
    y = torch.ones(n, 12, dtype=dtype)
    wrapper.add_lora_linear(y, x, (a, a), (b, b), 0.5, (6, 6))
    rtol, atol = (0.02, 0.05) if dtype == torch.bfloat16 else (None, None)  # None: defaults
    torch.testing.assert_close(
        y.float() - 1, torch.cat([by_hand, by_hand], dim=1), rtol=rtol, atol=atol
    )
    before = y.clone()
    wrapper.routing = Routing(torch.full((n,), -1))  # no row has an adapter: nothing added
    wrapper.add_lora_linear(y, x, (a,), (b,), 1.0, (6,))
    torch.testing.assert_close(y, before)
    one = Routing(torch.ones(n, dtype=torch.long))  # one adapter: plain matmuls
    delta = one.delta(x, a, b, dtype).float()
    torch.testing.assert_close(delta, xf @ af[1, 0].T @ bf[1, 0].T, rtol=rtol, atol=atol)
    with_base = Routing(rows.clamp(max=0)).delta(x, a, b, dtype).float()  # base rows: none
    by_hand = (rows >= 0).unsqueeze(-1) * (xf @ af[0, 0].T @ bf[0, 0].T)
    torch.testing.assert_close(with_base, by_hand, rtol=rtol, atol=atol)


def test_our_cpu_lora_ops_refuse_a_vllm_whose_ops_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    def bgmv_shrink(inputs: torch.Tensor, weights: torch.Tensor) -> None: ...

    monkeypatch.setattr(lora_ops, "bgmv_shrink", bgmv_shrink)
    assert_refuses(use_our_cpu_lora_ops, VllmLoRAOpsChanged, "bgmv_shrink")


def assert_refuses(
    plugin: functools._lru_cache_wrapper[None], error: type[Exception], match: str
) -> None:
    """`plugin`, run afresh, raises `error`; run afresh again after."""
    plugin.cache_clear()
    try:
        with pytest.raises(error, match=match):
            plugin()
    finally:
        plugin.cache_clear()


def test_vllms_queue_readers_spin_briefly(tmp_path: Path) -> None:
    """Our plugin, registered with vLLM, makes a reader of its shared-memory queues spin 10 ms
    after a message (vLLM's own: 1 s) before it sleeps."""
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    plugins = entry_points(group="vllm.general_plugins")
    assert "server.vllm_cpu_queues:spin_briefly" in [p.value for p in plugins]
    spin_briefly()
    context = zmq.Context()
    try:
        address = f"ipc://{tmp_path / 'notify'}"
        reader = SpinCondition(is_reader=True, context=context, notify_address=address)
        assert reader.busy_loop_s == SPIN_S
        told = SpinCondition(True, context, address, busy_loop_s=2.0)  # as vLLM may name it
        assert told.busy_loop_s == 2.0
    finally:
        context.destroy(linger=0)  # closes the readers' sockets


def test_our_queue_plugin_refuses_a_vllm_whose_queues_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    def __init__(self: object, is_reader: bool) -> None: ...

    monkeypatch.setattr(SpinCondition, "__init__", __init__)
    assert_refuses(spin_briefly, VllmQueuesChanged, "busy_loop_s")


def test_engine_dtype_auto_follows_the_cpu() -> None:
    """No GPU here: bfloat16 exactly where the CPU computes it natively, as the generator reads;
    a name vLLM takes passes, another fails before the engine starts."""
    assert not torch.cuda.is_available()
    assert engine_dtype("auto") == ("bfloat16" if native_bfloat16() else "float32")
    assert engine_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="Unknown dtype"):
        engine_dtype("float8")
