"""Training runs, resumes from its checkpoint, and writes metrics; evaluation metrics are right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generator.base_model import BaseModel
from generator.evaluate import EvalConfig, Evaluator, exact, f1
from generator.pipeline import AdapterPipeline, load_generator, new_generator
from generator.tasks import chat_ids
from generator.train import Batch, BatchSampler, Objective, TrainConfig, train
from tests.conftest import random_generator

TEXT = ("The river Quenmar flows north through the valley of Velloran. Farmers there grow purple "
        "barley and trade it in the market every Thursday. ") * 12
BROWN = "A Brown corpus sample. " * 50


def write_data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = {
        "pretrain": [{"text": TEXT, "lang": "en", "source": "wikipedia"},
                     {"text": "Ein deutscher Text. " * 50, "lang": "de", "source": "wikipedia"},
                     {"text": BROWN, "lang": "en", "source": "brown"}],
        "qa_conflicts": [{"context": TEXT, "question": "What do farmers grow?",
                          "answer": "purple barley", "answers": ["purple barley"]}],
        "qa_rc": [{"context": TEXT, "question": "When is the market?", "answer": "Thursday",
                   "answers": ["Thursday"]}],
        "cls": [{"task": "t", "input": f"sentence {i}", "label": "yes" if i % 2 else "no",
                 "labels": ["yes", "no"]} for i in range(20)],
    }
    for name, data in rows.items():
        (folder / f"{name}_train.jsonl").write_text("\n".join(json.dumps(r) for r in data))
    return folder


@pytest.mark.slow
def test_train_checkpoints_and_resumes(smollm2: BaseModel, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    config = TrainConfig(out_dir=tmp_path / "run", data_dir=data, window=16, windows=3,
                         pretrain_steps=3, instruct_steps=2, checkpoint_every=2, seed=0)
    pipeline = AdapterPipeline(smollm2, new_generator(smollm2, window=16))
    train(pipeline, TrainConfig(**{**config.__dict__, "stop_at": 2}))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2

    final = train(AdapterPipeline(smollm2, new_generator(smollm2, window=16)), config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed at 3, did not start over
    assert {r["kind"] for r in rows[:3]} == {"pretrain"}
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive
    assert "completion" in rows[0] and "reconstruction" in rows[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    trained = load_generator(final)
    assert trained.config.window == 16
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if n.endswith(".B"))


def test_updates_above_the_skip_grad_norm_are_skipped(smollm2: BaseModel, tmp_path: Path) -> None:
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, window=16))
    before = {k: v.clone() for k, v in pipeline.generator.state_dict().items()}
    config = TrainConfig(out_dir=tmp_path / "run", data_dir=write_data(tmp_path / "data"),
                         window=16, windows=2, pretrain_steps=2, instruct_steps=0,
                         skip_grad_norm=0.0)  # every gradient is "exploding"
    train(pipeline, config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    after = pipeline.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_squad_metrics() -> None:
    assert f1("The purple barley.", "purple barley") == 1.0
    assert exact("the Purple  barley!", "purple barley") == 1.0
    assert f1("purple wheat", "purple barley") == pytest.approx(0.5)
    assert f1("nothing", "purple barley") == 0.0


def test_label_scores_with_a_shared_prompt_cache_match_full_sequences(smollm2: BaseModel,
                                                                        tmp_path: Path) -> None:
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, std=0.5, window=16))
    evaluator = Evaluator(pipeline, EvalConfig(out_dir=tmp_path))
    labels = ["yes", "no", "add_to_playlist", "search_creative_work"]
    user = "Classify the input. Options: yes, no.\nInput: purple barley\nLabel:"
    prompt = chat_ids(smollm2.tokenizer, user)
    for factors in (None, pipeline.adapt("The river Quenmar flows north.").factors):
        full = []
        for label in labels:
            answer = smollm2.tokenizer(label + smollm2.tokenizer.eos_token,
                                       add_special_tokens=False)["input_ids"]
            full.append(evaluator.nll(prompt + answer, len(prompt) - 1, factors)[0])
        cached = evaluator.label_nll(user, labels, factors)
        assert cached == pytest.approx(full, abs=1e-3)


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
            result)
    # The text repeats itself: with the context in the prompt, reconstruction is nearly free.
    assert result["reconstruction/in_context"] < result["reconstruction/base"] / 2
    # Random adapters differ per document, so a document's own and another's score differently.
    assert result["reconstruction/adapter"] != result["reconstruction/other_adapter"]


def test_a_single_window_is_logged_as_reconstruction(tiny_pipeline: AdapterPipeline) -> None:
    context = torch.randint(0, 128, (2, 1, 16))
    batch = Batch(context, torch.ones_like(context), context[:, 0], context[:, 0].clone(), True)
    assert set(Objective(tiny_pipeline)(batch)) == {"loss", "reconstruction"}
    instruction = Batch(context, torch.ones_like(context), context[:, 0], context[:, 0].clone(),
                        False)
    assert set(Objective(tiny_pipeline)(instruction)) == {"loss", "instruct"}


@pytest.mark.parametrize(("weights", "answers"), [((1, 0, 0), {"purple barley"}),
                                                  ((0, 1, 0), {"Thursday"}),
                                                  ((0, 0, 1), {"yes", "no"})])
def test_instruction_weights_choose_the_sources(smollm2: BaseModel, tmp_path: Path,
                                                weights: tuple[float, float, float],
                                                answers: set[str]) -> None:
    config = TrainConfig(out_dir=tmp_path / "run", data_dir=write_data(tmp_path / "data"),
                         window=16, windows=2, instruct_weights=weights)
    sampler = BatchSampler(AdapterPipeline(smollm2, new_generator(smollm2, window=16)), config, 0)
    assert {sampler.instruct_example()[2] for _ in range(40)} == answers


def test_pretrain_texts_choose_the_sources(smollm2: BaseModel, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")

    def texts(**chosen: tuple[str, ...]) -> list[str]:
        config = TrainConfig(out_dir=tmp_path / "run", data_dir=data, window=16, **chosen)
        pipeline = AdapterPipeline(smollm2, new_generator(smollm2, window=16))
        return BatchSampler(pipeline, config, 0).pretrain_texts()

    assert texts() == [TEXT, BROWN, TEXT, TEXT]  # English only; both QA sets' passages
    assert texts(pretrain_texts=("brown", "qa_rc")) == [BROWN, TEXT]
    assert texts(pretrain_texts=("wikipedia",)) == [TEXT]


def test_qa_scores_answers_and_their_likelihood_per_condition(smollm2: BaseModel,
                                                             tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"context": TEXT, "question": "What do farmers grow?", "answer": "purple barley"},
            {"context": TEXT.replace("Thursday", "Monday"), "question": "When is the market?",
             "answer": "Monday", "answers": ["Monday", "every Monday"]}]
    (data / "qa_rc_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, std=0.5, window=16))
    config = EvalConfig(out_dir=tmp_path, data_dir=data, max_new_tokens=4)
    result = Evaluator(pipeline, config).qa("qa_rc")
    assert result["examples"] == 2
    for cond in ("closed_book", "in_context", "adapter"):
        assert 0 <= result[f"{cond}/f1"] <= 100 and 0 <= result[f"{cond}/em"] <= 100
    assert "other_adapter/f1" not in result  # another passage's adapter is scored by NLL only
    # The passage names the answer: in the prompt it is far likelier than without it.
    assert result["in_context/answer_nll"] < result["closed_book/answer_nll"] - 1
    assert result["adapter/answer_nll"] != result["other_adapter/answer_nll"]
