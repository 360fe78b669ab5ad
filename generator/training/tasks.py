"""Prompt formats shared by instruction tuning and evaluation, so both see the same text."""

from __future__ import annotations

import random

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

QA_INSTRUCTION = "Answer with a short phrase from the text."
# How a user may ask about a document: the training template, the bare question, a brief ask.
# An adapter must answer under each, so evaluation reports each and training draws from all.
PHRASINGS = ("instruction", "bare", "brief")


def qa_prompt(question: str, context: str | None = None, phrasing: str = "instruction") -> str:
    """User message for document QA; `context` in the prompt is the in-context baseline."""
    head = f"{context}\n\n" if context else ""
    if phrasing == "instruction":
        return f"{head}{QA_INSTRUCTION}\nQuestion: {question}"
    if phrasing == "bare":
        return f"{head}{question}"
    if phrasing == "brief":
        return f"{head}{question} Answer briefly."
    raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")


def demos_text(demos: list[dict]) -> str:
    """k labelled examples as one context: what the adapter (or the prompt) learns from."""
    return "\n\n".join(f"Input: {d['input']}\nLabel: {d['label']}" for d in demos)


def cls_prompt(example: dict, demos: list[dict] | None = None) -> str:
    """User message for few-shot classification; `demos` in the prompt is the ICL baseline."""
    head = f"{demos_text(demos)}\n\n" if demos else ""
    options = ", ".join(example["labels"])
    return f"{head}Classify the input. Options: {options}.\nInput: {example['input']}\nLabel:"


def by_task(rows: list[dict]) -> dict[str, list[dict]]:
    pool: dict[str, list[dict]] = {}
    for r in rows:
        pool.setdefault(r["task"], []).append(r)
    return pool


def sample_demos(
    pool: dict[str, list[dict]], task: str, k: int, rng: random.Random, exclude: str | None = None
) -> list[dict]:
    """k demonstrations of `task` from `pool`, never the example being asked about."""
    candidates = [r for r in pool[task] if r["input"] != exclude]
    return rng.sample(candidates, min(k, len(candidates)))


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of `answer` as the assistant's whole reply (it ends the turn)."""
    return tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """Token ids of a one-turn chat, ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    return list(ids)
