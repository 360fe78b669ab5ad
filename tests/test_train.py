"""Training runs, resumes from its checkpoint, and writes metrics; evaluation metrics are right."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from generator.base_model import BaseModel
from generator.model import LoRAFactors
from generator.pipeline import AdapterPipeline, load_generator, new_generator
from generator.training.data import QA_SETS
from generator.training.evaluate import (
    BASELINE_CACHE,
    EvalConfig,
    Evaluator,
    contains,
    gain_recovered,
    greedy_ids,
    summed_nll,
)
from generator.training.tasks import PHRASINGS, chat_ids
from generator.training.train import (
    IGNORE,
    Batch,
    BatchSampler,
    Objective,
    TrainConfig,
    distill_loss,
    train,
)
from tests.conftest import BROWN, TEXT, random_generator, write_data


def test_train_checkpoints_and_resumes(tiny_base: BaseModel, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    config = TrainConfig(
        out_dir=tmp_path / "run",
        data_dir=data,
        window=16,
        windows=3,
        pretrain_steps=3,
        instruct_steps=2,
        checkpoint_every=2,
        eval_every=5,
        eval_examples=1,
        train_questions=2,
        teacher_max_tokens=4,
        seed=0,
    )
    pipeline = AdapterPipeline(tiny_base, new_generator(tiny_base, window=16))
    train(pipeline, TrainConfig(**{**config.__dict__, "stop_at": 2}))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2

    final = train(AdapterPipeline(tiny_base, new_generator(tiny_base, window=16)), config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] != "validation"]
    checks = [r for r in rows if r["kind"] == "validation"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]  # resumed at 3, did not start over
    assert {r["kind"] for r in steps[:3]} == {"pretrain"}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert "completion" in steps[0] and "reconstruction" in steps[0]
    # validation ran where the run started and in the loop at step 5, on both QA sets, and on
    # the questions trained on (train_questions)
    assert [r["step"] for r in checks] == [0, 5]
    answerable = {f"{qa}/{p}/answerable" for qa in QA_SETS for p in PHRASINGS}
    assert {"gain", "other_gain", "train/gain", *answerable} <= set(checks[1])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    trained = load_generator(final)
    assert trained.config.window == 16
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if n.endswith(".B"))


def test_updates_above_the_skip_grad_norm_are_skipped(tiny_base: BaseModel, tmp_path: Path) -> None:
    pipeline = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16))
    before = {k: v.clone() for k, v in pipeline.generator.state_dict().items()}
    config = TrainConfig(
        out_dir=tmp_path / "run",
        data_dir=write_data(tmp_path / "data"),
        window=16,
        windows=2,
        pretrain_steps=2,
        instruct_steps=0,
        skip_grad_norm=0.0,
        eval_every=0,
    )  # every gradient is "exploding"
    train(pipeline, config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    after = pipeline.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_reply_is_correct_when_it_holds_a_reference_answer() -> None:
    assert contains("Farmers there grow purple barley.", ["purple barley"]) == 1.0
    assert contains("The Purple  Barley!", ["wheat", "purple barley"]) == 1.0
    assert contains("purple barleycorn", ["purple barley"]) == 0.0  # whole words only
    assert contains("purple wheat", ["purple barley"]) == 0.0


def test_gain_recovered_and_its_interval() -> None:
    closed = [0.0] * 8 + [1.0] * 2
    gain, low, high = gain_recovered(closed, [1.0] * 6 + [0.0] * 2 + [1.0] * 2)
    assert gain == pytest.approx(0.75)  # (0.8 - 0.2) / (1 - 0.2)
    assert low < gain < high
    assert gain_recovered(closed, closed)[0] == 0.0  # an adapter that adds nothing
    assert all(math.isnan(x) for x in gain_recovered([1.0] * 4, [1.0] * 4))  # no room to tell


def test_distill_loss_is_zero_only_when_the_student_matches() -> None:
    teacher = torch.randn(5, 11)
    assert distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(5, 11), teacher).item() > 0.01


def test_label_scores_with_a_shared_prompt_cache_match_full_sequences(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    pipeline = AdapterPipeline(tiny_base, random_generator(tiny_base, std=0.5, window=16))
    evaluator = Evaluator(pipeline, EvalConfig(out_dir=tmp_path))
    labels = ["yes", "no", "add_to_playlist", "search_creative_work"]
    user = "Classify the input. Options: yes, no.\nInput: purple barley\nLabel:"
    prompt = chat_ids(tiny_base.tokenizer, user)
    for factors in (None, pipeline.adapt("The river Quenmar flows north.").factors):
        full = []
        for label in labels:
            answer = tiny_base.tokenizer(
                label + tiny_base.tokenizer.eos_token, add_special_tokens=False
            )["input_ids"]
            full.append(
                summed_nll(pipeline.base.model, prompt + answer, len(prompt) - 1, factors)[0]
            )
        cached = evaluator.label_nll(user, labels, factors)
        assert cached == pytest.approx(full, abs=1e-3)


@pytest.mark.slow
def test_perplexity_protocol_scores_every_condition(smollm2: BaseModel, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    docs = [TEXT, TEXT.replace("Quenmar", "Ostavel").replace("purple", "golden")]
    rows = [{"text": t, "lang": "en", "source": "wikipedia"} for t in docs]
    rows.append({"text": BROWN, "lang": "en", "source": "brown"})
    (data / "pretrain_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, std=0.5, window=16))
    result = Evaluator(pipeline, EvalConfig(out_dir=tmp_path, data_dir=data)).perplexity()
    assert result["documents"] == 2
    for task in ("completion", "reconstruction"):
        assert {f"{task}/{c}" for c in ("base", "in_context", "adapter", "other_adapter")} <= set(
            result
        )
    # The text repeats itself: with the context in the prompt, reconstruction is nearly free.
    assert result["reconstruction/in_context"] < result["reconstruction/base"] / 2
    # Random adapters differ per document, so a document's own and another's score differently.
    assert result["reconstruction/adapter"] != result["reconstruction/other_adapter"]


def test_a_single_window_is_logged_as_reconstruction(tiny_pipeline: AdapterPipeline) -> None:
    context = torch.randint(0, 128, (2, 1, 16))
    batch = Batch(context, torch.ones_like(context), context[:, 0], context[:, 0].clone(), True)
    assert set(Objective(tiny_pipeline)(batch)) == {"loss", "reconstruction"}
    instruction = Batch(
        context, torch.ones_like(context), context[:, 0], context[:, 0].clone(), False
    )
    assert set(Objective(tiny_pipeline)(instruction)) == {"loss", "instruct"}


@pytest.mark.parametrize(
    ("weights", "source", "answers"),
    [
        ((1, 0, 0), "qa_conflicts", {"purple barley"}),
        ((0, 1, 0), "qa_rc", {"Thursday"}),
        ((0, 0, 1), "cls", {"yes", "no"}),
    ],
)
def test_instruction_weights_choose_the_sources(
    tiny_base: BaseModel,
    tmp_path: Path,
    weights: tuple[float, float, float],
    source: str,
    answers: set[str],
) -> None:
    config = TrainConfig(
        out_dir=tmp_path / "run",
        data_dir=write_data(tmp_path / "data"),
        window=16,
        windows=2,
        instruct_weights=weights,
    )
    sampler = BatchSampler(
        AdapterPipeline(tiny_base, new_generator(tiny_base, window=16)), config, 0
    )
    assert {sampler.source() for _ in range(20)} == {source}
    assert {sampler.instruct_example(source)[2] for _ in range(40)} == answers


def test_distilled_batches_pair_the_teacher_and_the_student(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    config = TrainConfig(
        out_dir=tmp_path / "run",
        data_dir=write_data(tmp_path / "data"),
        window=16,
        max_context_windows=2,
        batch_size=3,
        teacher_answers=0.5,
        teacher_max_tokens=6,
        seed=3,
    )
    pipeline = AdapterPipeline(tiny_base, random_generator(tiny_base, window=16))
    batch = BatchSampler(pipeline, config, 0).distill("qa_conflicts")
    assert batch.teacher is not None and batch.teacher_labels is not None
    assert batch.context.shape[1:] == (2, 16)  # the passage cut to two windows
    tok = tiny_base.tokenizer
    for i in range(3):
        student = batch.target[i][batch.target_labels[i] != IGNORE].tolist()
        teacher = batch.teacher[i][batch.teacher_labels[i] != IGNORE].tolist()
        assert student == teacher  # the same answer tokens: the dataset's or the teacher's
        assert student[-1] == tok.eos_token_id or len(student) == 6  # whole, or at the cap
        # the teacher reads the passage as the adapter does; the student never sees it
        cut = tok.decode(batch.context[i].flatten()[:16].tolist())
        assert cut in tok.decode(batch.teacher[i].tolist())
        assert "Quenmar" not in tok.decode(batch.target[i].tolist())
    losses = Objective(pipeline)(batch)
    assert set(losses) == {"loss", "distill"} and losses["loss"].item() > 0
    losses["loss"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in pipeline.generator.parameters()
    )


def test_pretrain_texts_choose_the_sources(tiny_base: BaseModel, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")

    def texts(pretrain_texts: Sequence[str] = TrainConfig.pretrain_texts) -> list[str]:
        config = TrainConfig(
            out_dir=tmp_path / "run", data_dir=data, window=16, pretrain_texts=pretrain_texts
        )
        pipeline = AdapterPipeline(tiny_base, new_generator(tiny_base, window=16))
        return BatchSampler(pipeline, config, 0).pretrain_texts()

    assert texts() == [TEXT, BROWN, TEXT, TEXT]  # English only; both QA sets' passages
    assert texts(pretrain_texts=("brown", "qa_rc")) == [BROWN, TEXT]
    assert texts(pretrain_texts=("wikipedia",)) == [TEXT]


def test_batched_greedy_with_an_adapter_per_prompt_matches_each_alone(tiny_base: BaseModel) -> None:
    pipeline = AdapterPipeline(tiny_base, random_generator(tiny_base, std=0.5, window=16))
    prompts = [chat_ids(tiny_base.tokenizer, q) for q in ("Where does the river flow?", "Hi")]
    adapters = [pipeline.adapt(TEXT).factors, pipeline.adapt(BROWN).factors]
    batched = greedy_ids(pipeline, prompts, adapters, max_new_tokens=6, batch_size=2)
    alone = [
        greedy_ids(pipeline, [p], [a], 6, 1)[0] for p, a in zip(prompts, adapters, strict=True)
    ]
    assert batched == alone
    assert batched != greedy_ids(pipeline, prompts, None, 6, 2)  # the adapters changed replies


@pytest.mark.slow
def test_qa_scores_answerable_questions_per_phrasing(
    smollm2: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"context": TEXT, "question": "What do farmers grow?", "answer": "purple barley"},
        {
            "context": TEXT.replace("Thursday", "Monday"),
            "question": "When is the market?",
            "answer": "Monday",
            "answers": ["Monday", "every Monday"],
        },
    ]
    (data / "qa_rc_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, std=0.5, window=16))
    config = EvalConfig(out_dir=tmp_path, data_dir=data, max_new_tokens=8)
    result = Evaluator(pipeline, config).qa("qa_rc")
    assert result["examples"] == 2
    # SmolLM2 reads an answer from the passage in its prompt under every phrasing
    answerable = [result[f"{p}/answerable"] for p in PHRASINGS]
    assert all(n >= 1 for n in answerable)
    assert result["all/questions"] == sum(answerable)
    for group in (*PHRASINGS, "all"):
        assert {f"{group}/{c}/acc" for c in ("closed_book", "adapter", "other_adapter")} | {
            f"{group}/adapter/gain",
            f"{group}/adapter/gain_low",
        } <= set(result)
    # The passage names the answer: in the prompt it is far likelier than without it.
    assert result["in_context/answer_nll"] < result["closed_book/answer_nll"]
    assert result["adapter/answer_nll"] != result["other_adapter/answer_nll"]

    # The base model's own replies are cached: a second evaluation generates only with adapters.
    assert (data / BASELINE_CACHE).is_file()
    evaluator = Evaluator(pipeline, config)
    real = evaluator.greedy

    def adapters_only(prompts: list[list[int]], factors: list[LoRAFactors] | None) -> list[str]:
        assert factors is not None, "a base-model reply was generated again"
        return real(prompts, factors)

    monkeypatch.setattr(evaluator, "greedy", adapters_only)
    assert evaluator.qa("qa_rc") == result
