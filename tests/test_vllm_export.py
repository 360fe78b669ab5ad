"""What `genadapter adapt` writes, vLLM serves: greedy outputs equal PEFT's, token for token."""

from __future__ import annotations

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
from server.vllm_cpu_lora import skip_base_rows_in_cpu_lora_ops
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


def test_base_rows_in_a_batch_with_adapters_get_no_adapter_on_a_cpu() -> None:
    """vLLM's CPU LoRA ops read a base-model row's index, -1, as the last adapter slot; fixed,
    such a row gets no delta, and each adapter row its own, decoding and prefilling."""
    skip_base_rows_in_cpu_lora_ops()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    torch.manual_seed(0)
    x, rows = torch.randn(3, 8), torch.tensor([-1, 0, 1])  # base, slot 0, slot 1 (the last)
    a, b = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 8, 4)  # two slots of rank 4
    by_hand = [torch.zeros(8)] + [b[s, 0] @ (a[s, 0] @ x[s + 1]) for s in (0, 1)]
    shrunk, prefilled = torch.zeros(3, 4), torch.zeros(3, 4)
    punica_cpu.bgmv_shrink(x, a, shrunk, rows, 1.0)
    ones = torch.ones(3)  # one token per request
    lora_ops.sgmv_shrink(x, a, prefilled, ones.cumsum(0) - 1, ones.long(), rows, 3, 1, 3, 1.0)
    torch.testing.assert_close(prefilled, shrunk)
    out, sliced = torch.ones(3, 8), torch.ones(3, 16)
    punica_cpu.bgmv_expand(shrunk, b, out, rows, True)
    punica_cpu.bgmv_expand_slice(shrunk, b, sliced, rows, 8, 8, True)
    torch.testing.assert_close(out - 1, torch.stack(by_hand))
    torch.testing.assert_close(sliced[:, 8:], out)
    by_name = torch.ones(3, 8)
    punica_cpu.bgmv_expand(shrunk, b, by_name, rows, add_inputs=True)  # as the logits layer calls
    torch.testing.assert_close(by_name, out)


def test_engine_dtype_auto_follows_the_cpu() -> None:
    """No GPU here: bfloat16 exactly where the CPU computes it natively, as the generator reads;
    a name vLLM takes passes, another fails before the engine starts."""
    assert not torch.cuda.is_available()
    assert engine_dtype("auto") == ("bfloat16" if native_bfloat16() else "float32")
    assert engine_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="Unknown dtype"):
        engine_dtype("float8")
