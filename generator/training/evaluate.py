"""Evaluate a generator against its base model on held-out (test split) data.

Three measurements, each with and without the context, and with the generated adapter:
perplexity (the paper's Table 2 protocol), document QA (SQuAD F1/EM) and few-shot
classification. Writes JSON, a markdown table and a bar chart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import GenerationMixin

from generator.lora import applied
from generator.model import LoRAFactors
from generator.pipeline import AdapterPipeline
from generator.training.data import QA_SETS, default_data_dir, load_split
from generator.training.tasks import (
    PHRASINGS,
    answer_ids,
    by_task,
    chat_ids,
    cls_prompt,
    demos_text,
    qa_prompt,
    sample_demos,
)

BASELINE_CACHE = "baseline_replies.json"  # in the data folder: the base model's own replies
BOOTSTRAP_SAMPLES = 2000


@dataclass
class EvalConfig:
    out_dir: Path
    data_dir: Path = field(default_factory=default_data_dir)
    ppl_window: int | None = None  # W of the Table 2 protocol; default: the generator's window
    ppl_docs: int = 100
    # questions per QA set (in QA_SETS order; one number for all), before keeping the answerable
    qa_examples: tuple[int, ...] = (1000,)
    cls_examples: int = 50  # per classification task and k
    shots: tuple[int, ...] = (4, 16)
    max_new_tokens: int = 24
    batch_size: int = 16  # prompts per greedy batch
    seed: int = 0


class Evaluator:
    def __init__(self, pipeline: AdapterPipeline, config: EvalConfig) -> None:
        self.pipeline, self.config = pipeline, config
        self.tok = pipeline.base.tokenizer
        self.model = pipeline.base.model
        path = config.data_dir / BASELINE_CACHE
        self.baseline_cache: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def save_baseline_cache(self) -> None:
        """Merge into the file (another evaluation may be writing it too), atomically."""
        path = self.config.data_dir / BASELINE_CACHE
        if path.is_file():
            self.baseline_cache = json.loads(path.read_text()) | self.baseline_cache
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump(self.baseline_cache, f)
        os.replace(f.name, path)

    def adapter(self, text: str) -> LoRAFactors:
        return self.pipeline.adapt(text).factors

    def perplexity(self) -> dict[str, float]:
        """Table 2: the first W tokens are the context; score the next W (completion) and the
        same W (reconstruction). The first target token is never scored, so every condition
        predicts the same W - 1 tokens. `other_adapter` applies the adapter of another document:
        what `adapter` gains beyond it is what the adapter stores about its own context."""
        w = self.config.ppl_window or self.pipeline.config.window
        docs = [
            self.tok(r["text"], add_special_tokens=False)["input_ids"]
            for r in load_split(self.config.data_dir, "pretrain", "test")
            if r["source"] == "wikipedia" and r["lang"] == "en"
        ]
        pairs = [(ids[:w], ids[w : 2 * w]) for ids in docs if len(ids) >= 2 * w]
        pairs = pairs[: self.config.ppl_docs]
        adapters = [
            self.adapter(cast(str, self.tok.decode(c)))  # one sequence decodes to one str
            for c, _ in tqdm(pairs, desc="adapters")
        ]
        totals: dict[str, list[float]] = {}
        for i, (context, following) in enumerate(tqdm(pairs, desc="perplexity")):
            for task, target in (("completion", following), ("reconstruction", context)):
                for cond, seq, start, f in (
                    ("base", target, 0, None),
                    ("in_context", context + target, w, None),
                    ("adapter", target, 0, adapters[i]),
                    ("other_adapter", target, 0, adapters[i - 1]),
                ):
                    _add_nll(totals, f"{task}/{cond}", *summed_nll(self.model, seq, start, f))
        return {k: math.exp(v[0] / v[1]) for k, v in totals.items()} | {"documents": len(pairs)}

    def greedy(self, prompts: list[list[int]], factors: list[LoRAFactors] | None) -> list[str]:
        """Greedy replies to chat `prompts` (token ids); `factors[i]` is applied to prompt i."""
        ids = greedy_ids(
            self.pipeline, prompts, factors, self.config.max_new_tokens, self.config.batch_size
        )
        return [r.strip() for r in self.tok.batch_decode(ids, skip_special_tokens=True)]

    def qa_rows(self, name: str, split: str = "test", examples: int | None = None) -> list[dict]:
        counts = self.config.qa_examples
        n = examples or counts[QA_SETS.index(name) if len(counts) > 1 else 0]
        return qa_sample(self.config.data_dir, name, split, n, self.config.seed)

    def prompts(self, rows: list[dict], phrasing: str, with_context: bool) -> list[list[int]]:
        return [
            chat_ids(
                self.tok, qa_prompt(r["question"], r["context"] if with_context else None, phrasing)
            )
            for r in rows
        ]

    def answerable(self, rows: list[dict], phrasing: str) -> tuple[list[int], list[float]]:
        """Rows the base model answers correctly with the passage in its prompt, and whether it
        answers each of them closed-book: the base model's part, the same for every generator."""
        in_context = _correct(rows, self.cached_greedy(self.prompts(rows, phrasing, True)))
        chosen = [i for i, ok in enumerate(in_context) if ok]
        picked = [rows[i] for i in chosen]
        return chosen, _correct(picked, self.cached_greedy(self.prompts(picked, phrasing, False)))

    def qa(self, name: str, split: str = "test", examples: int | None = None) -> dict[str, float]:
        """Gain recovered on questions the base model answers correctly with the passage in its
        prompt (chosen by that answer alone), per phrasing and over all of them (`all`), with a
        bootstrap 95% interval.

        A reply is correct when it contains a reference answer (normalized, whole words).
        gain = (adapter - closed_book) / (in_context - closed_book), in_context = 1 on the
        chosen questions. `other_adapter` (another passage's adapter) is the control: it must
        not help. Also the reference answer's NLL (nats/token) per condition, on the questions
        chosen under any phrasing."""
        rows = self.qa_rows(name, split, examples)
        adapters: dict[int, LoRAFactors] = {}

        def adapter(i: int) -> LoRAFactors:
            if i not in adapters:
                adapters[i] = self.adapter(rows[i]["context"])
            return adapters[i]

        out: dict[str, float] = {"examples": len(rows)}
        pooled: dict[str, list[float]] = {}
        for phrasing in PHRASINGS:
            chosen, closed = self.answerable(rows, phrasing)
            out[f"{phrasing}/answerable"] = len(chosen)
            if not chosen:
                continue
            picked = [rows[i] for i in chosen]
            questions = self.prompts(picked, phrasing, False)
            other_of = chosen[1:] + chosen[:1]  # the next chosen passage's adapter
            scores = {"closed_book": closed}
            for cond, owners in (("adapter", chosen), ("other_adapter", other_of)):
                replies = self.greedy(questions, [adapter(i) for i in owners])
                scores[cond] = _correct(picked, replies)
            for cond, values in scores.items():
                pooled.setdefault(cond, []).extend(values)
            _report_gains(out, phrasing, scores, self.config.seed)
        if pooled:
            _report_gains(out, "all", pooled, self.config.seed)
        nlls: dict[str, list[float]] = {}
        for i in tqdm(sorted(set(adapters)), desc=f"answer nll {name}"):
            question = qa_prompt(rows[i]["question"])
            for cond, user, f in (
                ("closed_book", question, None),
                ("in_context", qa_prompt(rows[i]["question"], rows[i]["context"]), None),
                ("adapter", question, adapter(i)),
                ("other_adapter", question, adapter((i + 1) % len(rows))),
            ):
                prompt = chat_ids(self.tok, user)
                ids = prompt + answer_ids(self.tok, rows[i]["answer"])
                _add_nll(nlls, cond, *summed_nll(self.model, ids, len(prompt) - 1, f))
        for cond, (total, count) in nlls.items():
            out[f"{cond}/answer_nll"] = total / count
        return out

    def cached_greedy(self, prompts: list[list[int]]) -> list[str]:
        """Greedy replies of the base model alone: they do not depend on the generator, so they
        are kept in `baseline_cache` and computed once per base model and prompt."""
        keys = [
            hashlib.sha256(
                f"{self.pipeline.base.name}\0{self.config.max_new_tokens}\0{p}".encode()
            ).hexdigest()[:24]
            for p in prompts
        ]
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.baseline_cache}
        if todo:
            replies = self.greedy(list(todo.values()), None)
            self.baseline_cache.update(zip(todo, replies, strict=True))
            self.save_baseline_cache()
        return [self.baseline_cache[k] for k in keys]

    @torch.no_grad()
    def label_nll(self, user: str, labels: list[str], factors: LoRAFactors | None) -> list[float]:
        """Negative log-likelihood of each label as the assistant's answer.

        The prompt is read once and each label continues a copy of its KV cache: k-shot prompts
        are long, labels short."""
        prompt = chat_ids(self.tok, user)
        nlls = []
        with applied(factors):
            first = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            for label in labels:
                answer = answer_ids(self.tok, label)
                cache = copy.deepcopy(first.past_key_values)
                rest = self.model(torch.tensor([answer]), past_key_values=cache).logits
                logits = torch.cat([first.logits[0], rest[0, :-1]])
                nlls.append(
                    F.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum").item()
                )
        return nlls

    def choose(self, user: str, labels: list[str], factors: LoRAFactors | None) -> str:
        """The label with the highest log-likelihood as the assistant's answer."""
        nlls = self.label_nll(user, labels, factors)
        return labels[nlls.index(min(nlls))]

    def classification(self) -> dict[str, float]:
        rng = random.Random(self.config.seed)
        pool = by_task(load_split(self.config.data_dir, "cls", "train"))  # demonstrations only
        out: dict[str, float] = {}
        for task, rows in sorted(by_task(load_split(self.config.data_dir, "cls", "test")).items()):
            rows = rng.sample(rows, min(len(rows), self.config.cls_examples))
            correct: Counter[str] = Counter()
            for row in tqdm(rows, desc=f"cls {task}"):
                zero = self.choose(cls_prompt(row), row["labels"], None)
                correct["zero_shot"] += zero == row["label"]
                for k in self.config.shots:
                    demos = sample_demos(pool, task, k, rng, row["input"])
                    icl = self.choose(cls_prompt(row, demos), row["labels"], None)
                    factors = self.adapter(demos_text(demos))
                    ada = self.choose(cls_prompt(row), row["labels"], factors)
                    correct[f"{k}_shot_in_context"] += icl == row["label"]
                    correct[f"{k}_shot_adapter"] += ada == row["label"]
            for cond, c in correct.items():
                out[f"{task}/{cond}"] = 100 * c / len(rows)
        return out


@torch.no_grad()
def summed_nll(
    model: nn.Module, ids: list[int], score_from: int, factors: LoRAFactors | None
) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[score_from + 1:] under `model` with `factors`
    applied, and how many tokens."""
    with applied(factors):
        logits = model(torch.tensor([ids])).logits[0, score_from:-1]
    target = torch.tensor(ids[score_from + 1 :])
    return F.cross_entropy(logits.float(), target, reduction="sum").item(), len(target)


def _add_nll(totals: dict[str, list[float]], key: str, nll: float, count: int) -> None:
    """Sum NLL and tokens per key, so that the mean weighs every token alike."""
    acc = totals.setdefault(key, [0.0, 0])
    acc[0] += nll
    acc[1] += count


@torch.no_grad()
def greedy_ids(
    pipeline: AdapterPipeline,
    prompts: list[list[int]],
    factors: list[LoRAFactors] | None,
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy reply ids (up to and including EOS) to chat `prompts`, in left-padded batches;
    `factors[i]` (one adapter per prompt) is applied to prompt i."""
    tok, model = pipeline.base.tokenizer, pipeline.base.model
    assert isinstance(model, GenerationMixin)  # a causal LM (AutoModelForCausalLM) generates
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    replies: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="greedy", unit="batch", leave=False):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device
        )
        batched = None if factors is None else stack_factors(factors[start : start + batch_size])
        with applied(batched):
            # transformers types generate's self as a Protocol (GenerativePreTrainedModel) that
            # its own models fail under mypy (hf_device_map, read-only device and dtype)
            out = model.generate(  # type: ignore[misc]
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            replies.append(row[:end])
    return replies


def qa_sample(data_dir: Path, name: str, split: str, n: int, seed: int) -> list[dict]:
    """A seeded sample of n questions of a QA split (those whose answer normalizes to nothing
    dropped): what evaluation asks, and what an overfitting check trains on."""
    rows = [r for r in load_split(data_dir, name, split) if any(map(normalize, _answers(r)))]
    return random.Random(seed).sample(rows, min(len(rows), n))


def _answers(row: dict) -> list[str]:
    return row.get("answers") or [row["answer"]]


def _correct(rows: list[dict], replies: list[str]) -> list[float]:
    return [contains(reply, _answers(r)) for r, reply in zip(rows, replies, strict=True)]


def _report_gains(
    out: dict[str, float], group: str, scores: dict[str, list[float]], seed: int
) -> None:
    """Accuracy per condition and gain recovered (95% interval) of each adapter condition."""
    out[f"{group}/questions"] = len(scores["closed_book"])
    for cond, values in scores.items():
        out[f"{group}/{cond}/acc"] = 100 * sum(values) / len(values)
    for cond in ("adapter", "other_adapter"):
        gain, low, high = gain_recovered(scores["closed_book"], scores[cond], seed)
        out[f"{group}/{cond}/gain"] = 100 * gain
        out[f"{group}/{cond}/gain_low"] = 100 * low
        out[f"{group}/{cond}/gain_high"] = 100 * high


def stack_factors(adapters: list[LoRAFactors]) -> LoRAFactors:
    """One batched adapter from per-prompt ones: factor i applies to prompt i."""
    return {
        name: (torch.cat([f[name][0] for f in adapters]), torch.cat([f[name][1] for f in adapters]))
        for name in adapters[0]
    }


def normalize(text: str) -> str:
    """SQuAD answer normalization: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def contains(reply: str, answers: list[str]) -> float:
    """1.0 when the reply holds a reference answer as whole words (normalized), else 0.0.

    Chat replies are sentences ("He was born in 1965."): exact match or F1 would punish the
    wording, not the content."""
    padded = f" {normalize(reply)} "
    return float(any(f" {a} " in padded for a in map(normalize, answers) if a))


def gain_recovered(
    closed: list[float], adapter: list[float], seed: int = 0
) -> tuple[float, float, float]:
    """(adapter - closed) / (1 - closed) on questions answered correctly in context, and its
    bootstrap 95% interval over questions. NaN where closed-book already answers them all."""

    def gain(idx: list[int]) -> float:
        c = sum(closed[i] for i in idx) / len(idx)
        a = sum(adapter[i] for i in idx) / len(idx)
        return (a - c) / (1 - c) if c < 1 else math.nan

    low, high = bootstrap_interval(gain, len(closed), seed)
    if math.isnan(low):
        return math.nan, math.nan, math.nan
    return gain(list(range(len(closed)))), low, high


def bootstrap_interval(
    statistic: Callable[[list[int]], float], n: int, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of `statistic` of n items (given the indices of a resample, drawn
    with replacement); resamples where it is NaN are left out, and (NaN, NaN) if all are."""
    rng = random.Random(seed)
    samples = sorted(
        g
        for g in (statistic([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP_SAMPLES))
        if not math.isnan(g)
    )
    if not samples:
        return math.nan, math.nan
    return samples[int(0.025 * len(samples))], samples[int(0.975 * len(samples)) - 1]


def evaluate(pipeline: AdapterPipeline, config: EvalConfig) -> dict[str, dict[str, float]]:
    """Run all three measurements; write results.json, results.md and results.png."""
    ev = Evaluator(pipeline, config)
    results = {
        "perplexity": ev.perplexity(),
        **{name: ev.qa(name) for name in QA_SETS},
        "classification": ev.classification(),
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (config.out_dir / "results.md").write_text(markdown(results))
    plot(results, config.out_dir / "results.png")
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = []
    for section, values in results.items():
        lines += [f"### {section}", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in values.items()
        ]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], png: Path) -> None:
    """One panel per section, bars per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5))
    for ax, (section, values) in zip(axes, results.items(), strict=True):
        items = [
            (k, v)
            for k, v in values.items()
            if isinstance(v, float)
            and (k.endswith("/gain") or section in ("perplexity", "classification"))
        ]
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set_title(section + (" (lower is better)" if section == "perplexity" else ""))
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
