"""Evaluate a generator against its base model on held-out (test split) data.

Three measurements, each with and without the context, and with the generated adapter:
perplexity (the paper's Table 2 protocol), document QA (SQuAD F1/EM) and few-shot
classification. Writes JSON, a markdown table and a bar chart.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from generator.data import DEFAULT_DATA_DIR, load_split
from generator.lora import applied
from generator.model import LoRAFactors
from generator.pipeline import AdapterPipeline
from generator.tasks import by_task, chat_ids, cls_prompt, demos_text, qa_prompt, sample_demos

UNPLOTTED = ("/em", "/answer_nll")  # QA panels show F1 only: one scale per panel


@dataclass
class EvalConfig:
    out_dir: Path
    data_dir: Path = DEFAULT_DATA_DIR
    ppl_window: int | None = None  # W of the Table 2 protocol; default: the generator's window
    ppl_docs: int = 100
    qa_examples: int = 100  # per QA set
    cls_examples: int = 50  # per classification task and k
    shots: tuple[int, ...] = (4, 16)
    max_new_tokens: int = 24
    seed: int = 0


class Evaluator:
    def __init__(self, pipeline: AdapterPipeline, config: EvalConfig) -> None:
        self.pipeline, self.config = pipeline, config
        self.tok = pipeline.base.tokenizer
        self.model = pipeline.base.model

    def adapter(self, text: str) -> LoRAFactors:
        return self.pipeline.adapt(text).factors

    @torch.no_grad()
    def nll(self, ids: list[int], score_from: int, factors: LoRAFactors | None
            ) -> tuple[float, int]:
        """Summed negative log-likelihood of ids[score_from + 1:], and how many tokens."""
        with applied(self.pipeline.lora_layers, factors):
            logits = self.model(torch.tensor([ids])).logits[0, score_from:-1]
        target = torch.tensor(ids[score_from + 1:])
        return F.cross_entropy(logits.float(), target, reduction="sum").item(), len(target)

    def perplexity(self) -> dict[str, float]:
        """Table 2: the first W tokens are the context; score the next W (completion) and the
        same W (reconstruction). The first target token is never scored, so every condition
        predicts the same W - 1 tokens. `other_adapter` applies the adapter of another document:
        what `adapter` gains beyond it is what the adapter stores about its own context."""
        w = self.config.ppl_window or self.pipeline.config.window
        docs = [self.tok(r["text"], add_special_tokens=False)["input_ids"]
                for r in load_split(self.config.data_dir, "pretrain", "test")
                if r["source"] == "wikipedia" and r["lang"] == "en"]
        pairs = [(ids[:w], ids[w:2 * w]) for ids in docs if len(ids) >= 2 * w]
        pairs = pairs[:self.config.ppl_docs]
        adapters = [self.adapter(self.tok.decode(c)) for c, _ in tqdm(pairs, desc="adapters")]
        totals: dict[str, list[float]] = {}
        for i, (context, following) in enumerate(tqdm(pairs, desc="perplexity")):
            for task, target in (("completion", following), ("reconstruction", context)):
                for cond, seq, start, f in (("base", target, 0, None),
                                            ("in_context", context + target, w, None),
                                            ("adapter", target, 0, adapters[i]),
                                            ("other_adapter", target, 0, adapters[i - 1])):
                    _add_nll(totals, f"{task}/{cond}", *self.nll(seq, start, f))
        return {k: math.exp(v[0] / v[1]) for k, v in totals.items()} | {"documents": len(pairs)}

    @torch.no_grad()
    def answer(self, prompt: list[int], factors: LoRAFactors | None) -> str:
        """Greedy reply to the chat `prompt` (token ids)."""
        ids = torch.tensor([prompt])
        with applied(self.pipeline.lora_layers, factors):
            out = self.model.generate(ids, max_new_tokens=self.config.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tok.eos_token_id)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of `answer` as the assistant's whole reply."""
        return self.tok(answer + self.tok.eos_token, add_special_tokens=False)["input_ids"]

    def qa(self, name: str) -> dict[str, float]:
        """SQuAD F1/EM of greedy answers, and the reference answer's NLL in nats/token: graded
        where F1 is still 0. `other_adapter` (NLL only) applies another passage's adapter: what
        `adapter` gains beyond it is what the adapter stores about its own passage."""
        rows = load_split(self.config.data_dir, name, "test")
        rows = random.Random(self.config.seed).sample(rows, min(len(rows), self.config.qa_examples))
        adapters = [self.adapter(r["context"]) for r in tqdm(rows, desc=f"adapters {name}")]
        scores: dict[str, list[tuple[float, float]]] = {}
        nlls: dict[str, list[float]] = {}
        for i, row in enumerate(tqdm(rows, desc=f"qa {name}")):
            answers = row.get("answers") or [row["answer"]]
            question = qa_prompt(row["question"])
            for cond, user, f in (("closed_book", question, None),
                                  ("in_context", qa_prompt(row["question"], row["context"]), None),
                                  ("adapter", question, adapters[i]),
                                  ("other_adapter", question, adapters[i - 1])):
                prompt = chat_ids(self.tok, user)
                ids = prompt + self.answer_ids(row["answer"])
                _add_nll(nlls, cond, *self.nll(ids, len(prompt) - 1, f))
                if cond != "other_adapter":
                    pred = self.answer(prompt, f)
                    scores.setdefault(cond, []).append(
                        (max(f1(pred, a) for a in answers), max(exact(pred, a) for a in answers)))
        out: dict[str, float] = {"examples": len(rows)}
        for cond, pairs in scores.items():
            out[f"{cond}/f1"] = 100 * sum(p[0] for p in pairs) / len(pairs)
            out[f"{cond}/em"] = 100 * sum(p[1] for p in pairs) / len(pairs)
        for cond, (total, count) in nlls.items():
            out[f"{cond}/answer_nll"] = total / count
        return out

    @torch.no_grad()
    def label_nll(self, user: str, labels: list[str], factors: LoRAFactors | None
                  ) -> list[float]:
        """Negative log-likelihood of each label as the assistant's answer.

        The prompt is read once and each label continues a copy of its KV cache: k-shot prompts
        are long, labels short."""
        prompt = chat_ids(self.tok, user)
        nlls = []
        with applied(self.pipeline.lora_layers, factors):
            first = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            for label in labels:
                answer = self.answer_ids(label)
                cache = copy.deepcopy(first.past_key_values)
                rest = self.model(torch.tensor([answer]), past_key_values=cache).logits
                logits = torch.cat([first.logits[0], rest[0, :-1]])
                nlls.append(F.cross_entropy(logits.float(), torch.tensor(answer),
                                            reduction="sum").item())
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


def _add_nll(totals: dict[str, list[float]], key: str, nll: float, count: int) -> None:
    """Sum NLL and tokens per key, so that the mean weighs every token alike."""
    acc = totals.setdefault(key, [0.0, 0])
    acc[0] += nll
    acc[1] += count


def normalize(text: str) -> str:
    """SQuAD answer normalization: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def evaluate(pipeline: AdapterPipeline, config: EvalConfig) -> dict[str, dict[str, float]]:
    """Run all three measurements; write results.json, results.md and results.png."""
    ev = Evaluator(pipeline, config)
    results = {
        "perplexity": ev.perplexity(),
        "qa_conflicts": ev.qa("qa_conflicts"),
        "qa_rc": ev.qa("qa_rc"),
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
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], png: Path) -> None:
    """One panel per section, bars per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5))
    for ax, (section, values) in zip(axes, results.items(), strict=True):
        items = [(k, v) for k, v in values.items()
                 if isinstance(v, float) and not k.endswith(UNPLOTTED)]
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set_title(section + (" (lower is better)" if section == "perplexity" else ""))
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
