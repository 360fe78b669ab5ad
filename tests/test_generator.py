"""The generator's math and export, on a tiny random Llama (fast) and on SmolLM2 (slow)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load
from transformers import AutoModelForCausalLM

from generator.base_model import (
    BaseModel,
    PackedLinear,
    ReadingDType,
    pack_linears,
    reading_dtype,
)
from generator.config import GeneratorConfig
from generator.lora import PEFT_CONFIG_FILE, applied, peft_tensors, write_peft_folder
from generator.maker import load_maker
from generator.model import AdapterGenerator, LoRAFactors, State, _svd_factors
from generator.pipeline import (
    DEFAULT_GENERATOR_DIR,
    AdapterPipeline,
    EmptyContextError,
    GeneratorError,
    load_generator,
    save_generator,
    state_from_bytes,
)
from server.settings import AdaptDType
from tests.conftest import random_generator

IDS = [(7 * i + 3) % 128 for i in range(48)]  # 3 windows of 16


def logits(pipeline: AdapterPipeline, ids: list[int], factors=None) -> torch.Tensor:
    with applied(factors):
        return pipeline.base.model(torch.tensor([ids])).logits


def peft_logits(base: BaseModel, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    fresh = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_untrained_generator_gives_exactly_zero_adapter(tiny_base: BaseModel) -> None:
    config = GeneratorConfig.for_base_model(tiny_base.model, tiny_base.name, window=16, rank=8)
    pipeline = AdapterPipeline(tiny_base, AdapterGenerator(config))
    adapter = pipeline.adapt_ids(IDS)
    assert all(torch.count_nonzero(b) == 0 for _, b in adapter.factors.values())
    assert torch.equal(logits(pipeline, IDS, adapter.factors), logits(pipeline, IDS))


def test_svd_normalization_has_unit_singular_values() -> None:
    s = torch.randn(3, 32, 32) @ torch.randn(3, 32, 32)
    u, v = _svd_factors(s, rank=8)
    singular = torch.linalg.svdvals(u @ v.transpose(-1, -2))
    assert torch.allclose(singular[:, :8], torch.ones(3, 8), atol=1e-5)
    assert singular[:, 8:].abs().max() < 1e-5


def test_svd_of_a_context_shorter_than_the_rank_keeps_only_its_directions() -> None:
    """Three tokens give S of rank 3: its other five directions are zero, not noise at full
    weight, and its gradient stays the size of a full-rank one instead of exploding."""
    torch.manual_seed(0)
    mix_u, mix_v = torch.randn(8, 32), torch.randn(8, 32)
    grads = {}
    for tokens in (3, 32):
        k, v = (torch.randn(1, tokens, 32, requires_grad=True) for _ in range(2))
        u_s, v_s = _svd_factors(k.mT @ v, rank=8)
        ((u_s @ mix_u) * (v_s @ mix_v)).sum().backward()
        assert k.grad is not None and v.grad is not None
        grads[tokens] = (k.grad.norm() + v.grad.norm()) / tokens**0.5
        if tokens == 3:
            assert torch.count_nonzero(u_s[..., 3:]) == torch.count_nonzero(v_s[..., 3:]) == 0
            assert torch.allclose(u_s[0, :, :3].T @ u_s[0, :, :3], torch.eye(3), atol=1e-5)
    assert grads[3] < 10 * grads[32]


def test_frobenius_normalization_exports_full_inner_rank(tiny_base: BaseModel) -> None:
    gen = random_generator(tiny_base, window=16, rank=8, inner_size=32, normalization="frobenius")
    adapter = AdapterPipeline(tiny_base, gen).adapt_ids(IDS)
    a, b = next(iter(adapter.factors.values()))
    assert a.shape[-2] == b.shape[-1] == 32 == gen.config.lora_rank


def test_peft_export_gives_same_logits(tiny_pipeline: AdapterPipeline, tmp_path: Path) -> None:
    adapter = tiny_pipeline.adapt_ids(IDS)
    folder = write_peft_folder(
        tmp_path / "adapter", adapter.peft_bytes(), tiny_pipeline.peft_config()
    )
    ours = logits(tiny_pipeline, IDS, adapter.factors)
    assert (ours - logits(tiny_pipeline, IDS)).abs().max() > 1e-3  # the adapter does something
    assert (ours - peft_logits(tiny_pipeline.base, folder, IDS)).abs().max() < 1e-4


def test_adapter_bytes_are_deterministic(tiny_base: BaseModel) -> None:
    first = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16, rank=8))
    second = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16, rank=8))
    assert first.adapt_ids(IDS).peft_bytes() == second.adapt_ids(IDS).peft_bytes()
    assert first.fingerprint == second.fingerprint


def test_extend_equals_one_shot(
    tiny_pipeline: AdapterPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tiny_pipeline.adapt_ids(IDS + IDS[:5])
    state, tokens = state_from_bytes(tiny_pipeline.adapt_ids(IDS[:32]).state_bytes())
    calls = []
    lora = tiny_pipeline.generator.lora

    def counted_lora(s: State) -> LoRAFactors:
        calls.append(1)
        return lora(s)

    monkeypatch.setattr(tiny_pipeline.generator, "lora", counted_lora)
    extended = tiny_pipeline.adapt_ids(IDS[32:] + IDS[:5], state, tokens)
    # S -> LoRA (an SVD per module) once per new window, read with the adapter before it, and
    # once for the result; none for the parent alone, which extending does not need
    assert len(calls) == 3  # 21 new tokens, window 16: two windows
    assert extended.tokens == whole.tokens == 53
    for name, (a, b) in whole.factors.items():
        ea, eb = extended.factors[name]
        assert torch.allclose(b @ a, eb @ ea, atol=1e-5)
        assert torch.allclose(whole.state[name], extended.state[name], rtol=1e-5, atol=1e-4)


def test_concurrent_adapts_share_the_base_model_safely(tiny_pipeline: AdapterPipeline) -> None:
    """The LoRA layers hold no adapter (each call passes its own), so adapts of different
    contexts in parallel threads give exactly the bytes each gives alone."""
    contexts = [IDS[i:] + IDS[:i] for i in range(0, 48, 6)]
    alone = [tiny_pipeline.adapt_ids(ids).peft_bytes() for ids in contexts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda ids: tiny_pipeline.adapt_ids(ids).peft_bytes(), contexts))
    assert together == alone


def test_windows_are_read_sequentially(tiny_pipeline: AdapterPipeline) -> None:
    """The second window is read with the first window's adapter applied, so order matters."""
    forward = tiny_pipeline.adapt_ids(IDS[:16] + IDS[16:32])
    backward = tiny_pipeline.adapt_ids(IDS[16:32] + IDS[:16])
    name = list(forward.state)[-1]  # layer 0 reads embeddings, which no adapter touches
    assert not torch.allclose(forward.state[name], backward.state[name])


def test_windows_read_at_once_share_the_adapter_of_the_steps_before(tiny_base: BaseModel) -> None:
    """With windows_at_once 2, windows 1-2 are read in one pass with no adapter, in either order,
    and window 3 with theirs: S is their states' sum, as one window at a time would add them."""
    at_once = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16, windows_at_once=2))
    forward = at_once.adapt_ids(IDS[:16] + IDS[16:32] + IDS[32:40])
    swapped = at_once.adapt_ids(IDS[16:32] + IDS[:16] + IDS[32:40])
    for name in forward.state:
        torch.testing.assert_close(forward.state[name], swapped.state[name], rtol=1e-5, atol=1e-5)
    first = at_once.read_window(torch.tensor([IDS[:16], IDS[16:32]]), None, None)[0]
    factors = at_once.generator.lora({k: v.sum(0, keepdim=True) for k, v in first.items()})
    third = at_once.read_window(torch.tensor([IDS[32:40]]), None, factors)[0]
    for name, s in forward.state.items():
        torch.testing.assert_close(s, first[name].sum(0, keepdim=True) + third[name])
    one_by_one = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16))
    assert one_by_one.fingerprint != at_once.fingerprint  # another reading: other adapter ids


def test_reading_stops_at_the_last_layers_input(tiny_pipeline: AdapterPipeline) -> None:
    """Reading alone gets the same S as the whole model's forward (training's, with logits),
    with an adapter applied too, and never runs the last decoder layer."""
    ids = torch.tensor([IDS[:16], IDS[16:32]])
    first = tiny_pipeline.read_window(ids, None, None)[0]
    factors = tiny_pipeline.generator.lora(first)
    last_layer_runs = []
    decoder = tiny_pipeline.base.model.get_decoder()
    hook = decoder.layers[-1].register_forward_hook(lambda *_: last_layer_runs.append(1))
    try:
        alone = tiny_pipeline.read_window(ids, None, factors)[0]
        assert not last_layer_runs
        whole, scores = tiny_pipeline.read_window(ids, None, factors, logits=True)
        assert last_layer_runs and scores is not None
    finally:
        hook.remove()
    for name, s in whole.items():
        assert torch.equal(alone[name], s)


def test_generator_round_trips_through_safetensors(
    tiny_pipeline: AdapterPipeline, tmp_path: Path
) -> None:
    save_generator(tiny_pipeline.generator, tmp_path / "gen")
    loaded = load_generator(tmp_path / "gen")
    assert loaded.config == tiny_pipeline.generator.config
    again = AdapterPipeline(tiny_pipeline.base, loaded)
    assert again.fingerprint == tiny_pipeline.fingerprint
    assert again.adapt_ids(IDS).peft_bytes() == tiny_pipeline.adapt_ids(IDS).peft_bytes()


def test_empty_context_is_an_error(tiny_pipeline: AdapterPipeline) -> None:
    with pytest.raises(EmptyContextError, match="empty"):
        tiny_pipeline.adapt_ids([])


def test_generator_for_another_base_model_is_rejected(tiny_base: BaseModel) -> None:
    config = GeneratorConfig(
        base_model="other",
        hidden_size=32,
        num_layers=2,
        modules={"o_proj": (32, 32)},
        inner_size=32,
        rank=8,
        module_paths={"o_proj": "self_attn.o_proj"},
    )
    with pytest.raises(GeneratorError, match="built for other"):
        AdapterPipeline(tiny_base, AdapterGenerator(config))


def test_missing_generator_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeneratorError, match="cannot read"):
        load_generator(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"rank": 64, "inner_size": 32}, "rank 64 exceeds inner_size 32"),
        ({"window": 0}, "window must be positive"),
        ({"windows_at_once": 0}, "windows_at_once must be positive"),
        ({"normalization": "l2"}, "normalization must be 'svd' or 'frobenius'"),
        ({"target_modules": ("q_proj", "nope")}, r"target modules \['nope'\] not found"),
    ],
)
def test_bad_config_says_what_to_change(tiny_base: BaseModel, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GeneratorConfig.for_base_model(tiny_base.model, tiny_base.name, **bad)


def test_down_proj_target(tiny_pipeline: AdapterPipeline, tmp_path: Path) -> None:
    base = tiny_pipeline.base
    gen = random_generator(base, target_modules=("o_proj", "down_proj"), window=16, rank=8)
    pipeline = AdapterPipeline(base, gen)
    adapter = pipeline.adapt_ids(IDS)
    assert adapter.factors["model.layers.1.mlp.down_proj"][0].shape == (1, 8, 96)
    folder = write_peft_folder(tmp_path / "a", adapter.peft_bytes(), pipeline.peft_config())
    assert '"down_proj"' in (folder / PEFT_CONFIG_FILE).read_text()
    ours = logits(pipeline, IDS, adapter.factors)
    assert (ours - peft_logits(base, folder, IDS)).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_adapter_matches_peft(smollm2: BaseModel, tmp_path: Path) -> None:
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2))
    assert pipeline.config.inner_size == 128 and pipeline.config.rank == 16
    text = "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair. " * 8
    adapter = pipeline.adapt(text)
    folder = write_peft_folder(tmp_path / "smol", adapter.peft_bytes(), pipeline.peft_config())
    ids = pipeline.tokenize("Where is the Eiffel Tower?")
    ours = logits(pipeline, ids, adapter.factors)
    assert (ours - logits(pipeline, ids)).abs().max() > 1e-3
    assert (ours - peft_logits(smollm2, folder, ids)).abs().max() < 1e-4


def test_adapt_dtype_setting_offers_what_the_generator_reads_in() -> None:
    assert get_args(AdaptDType) == get_args(ReadingDType)
    assert reading_dtype("float32") == torch.float32
    assert reading_dtype("bfloat16") == torch.bfloat16
    assert reading_dtype("auto") in (torch.float32, torch.bfloat16)


@pytest.mark.slow
def test_smollm2_reads_in_bfloat16_as_in_float32(smollm2: BaseModel) -> None:
    """The server reads in bfloat16 where the CPU has it: the adapter must be the same one,
    under its own id."""
    full = AdapterPipeline(smollm2, load_generator(DEFAULT_GENERATOR_DIR))
    half = load_maker(dtype="bfloat16")  # as the server reads: its weights packed
    text = "Marren Renkapel was born in 1965 in Peldrogan, a town on the river Ost. " * 12
    a, b = peft_tensors(full.adapt(text).factors), load(half.make(half.tokenize(text)).peft)
    cosines = []
    for name in (k for k in a if ".lora_A." in k):
        delta_a, delta_b = (f[name.replace("lora_A", "lora_B")] @ f[name] for f in (a, b))
        cosines.append(torch.cosine_similarity(delta_a.flatten(), delta_b.flatten(), 0).item())
    # bfloat16 kernels round differently by CPU: the lowest module 0.9982 on an AMD EPYC with
    # AVX-512 BF16 (mean 0.9998), above 0.999 on a Xeon with AMX
    assert sum(cosines) / len(cosines) > 0.999 and min(cosines) > 0.995, cosines
    assert full.fingerprint != half.fingerprint


def test_packed_linears_compute_what_the_linears_did() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32))
    model[0].to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model[0](x)
        pack_linears(model)
        got = model[0](x)
    assert isinstance(model[0], PackedLinear)
    assert isinstance(model[1], torch.nn.Linear)  # float32: left as it is
    assert got.shape == (3, 5, 96)
    torch.testing.assert_close(got, want)
